"""The structured config behind the Hydra yaml tree. Hydra merges every yaml file and override
into these dataclasses, so an unknown key or a wrong type fails before any process starts; the
choices and bounds on the fields (config.fields) are checked by config.validate."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.config.fields import bounded, one_of
from megatron_ext.config.rl import RLConfig


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, for logs
    source: str = ""  # where the shape comes from (paper, model card, guess)
    num_layers: int = bounded(2, at_least=1, what="transformer layers")  # transformer layers
    hidden_size: int = bounded(64, at_least=1, what="model width")  # model width
    num_attention_heads: int = bounded(4, at_least=1, what="query heads")  # query heads
    # KV heads (grouped-query attention); = heads for MHA
    num_query_groups: int = bounded(2, at_least=1, what="KV heads")
    # head dim; hidden_size / heads when unset
    kv_channels: Optional[int] = bounded(None, at_least=1, what="head dim, or null")
    # SwiGLU inner width (per branch)
    ffn_hidden_size: int = bounded(256, at_least=1, what="SwiGLU inner width")
    # 0: take the tokenizer's vocab size
    vocab_size: int = bounded(0, at_least=0, what="0 follows the tokenizer")
    # padding of the embedding (times tp)
    make_vocab_size_divisible_by: int = bounded(128, at_least=1, what="embedding padding")
    # longest sequence RoPE is built for
    max_position_embeddings: int = bounded(65536, at_least=1, what="RoPE length")
    rotary_base: int = 10000  # RoPE theta
    # RoPE frequency scaling: none | llama3 (Llama 3.x) | linear (position interpolation)
    rope_scaling: str = one_of("none", "llama3", "linear")
    rope_scaling_factor: float = 1.0  # the scaling factor of rope_scaling
    qkv_bias: bool = False  # biases on the Q, K and V projections (Qwen2)
    qk_layernorm: bool = False  # RMSNorm on each query and key head (Qwen3)
    # a Hugging Face model folder (model=hf): its config.json sets the shape, its weights start
    # the run, its tokenizer is data.tokenizer's default
    hf_path: Optional[str] = None
    tie_embeddings: bool = False  # share input embedding and output layer
    norm_epsilon: float = 1.0e-5  # RMSNorm epsilon
    init_method_std: float = 0.02  # weight init std
    dtype: str = one_of("fp32", "bf16")  # parameter/compute dtype
    # auto | true | false: fused linear cross-entropy (auto: off on a GPU without the CUDA build)
    fused_loss: str = one_of("auto", "true", "false", "True", "False")
    # auto | true | false: our recomputing SwiGLU (auto: as fused_loss)
    fused_swiglu: str = one_of("auto", "true", "false", "True", "False")
    attention_backend: str = one_of("auto", "sdpa", "flash", "local", "te")  # core attention


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    vpp: Optional[int] = None  # virtual pipeline chunks per rank (interleaved 1F1B)
    cp: int = 1  # context parallel size (ring attention)
    sequence_parallel: bool = False  # needs TE or apex norms (refused on CPU)
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap DP grad all-reduce with backward
    # process-group timeout: a dead rank ends the job after this
    timeout_s: int = bounded(600, at_least=1, what="seconds a collective waits for a missing rank")


@dataclass
class TrainConfig:
    # optimizer steps (0: evaluate the starting weights on the held-out data and exit)
    steps: int = bounded(100, at_least=0, what="optimizer steps; 0 only evaluates")
    seq_len: int = bounded(64, at_least=1, what="tokens per sample")  # tokens per sample
    micro_batch_size: int = 4  # samples per micro-batch per DP rank
    # samples per optimizer step, all DP ranks together
    global_batch_size: int = bounded(16, at_least=1, what="samples per optimizer step")
    lr: float = 1.0e-3  # peak learning rate
    min_lr: float = 1.0e-4  # final learning rate of the cosine decay
    warmup_steps: int = bounded(10, at_least=0, what="linear warm-up steps")  # linear warm-up steps
    lr_decay_style: str = one_of("cosine", "linear", "constant")  # shape of the decay to min_lr
    # AdamW decoupled weight decay
    weight_decay: float = bounded(0.01, at_least=0, what="AdamW weight decay")
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1.0e-8  # AdamW epsilon
    # global grad-norm clip (0 disables)
    clip_grad: float = bounded(1.0, at_least=0, what="grad-norm clip; 0 disables")
    # steps between progress lines / metrics records
    log_interval: int = bounded(1, at_least=1, what="steps between metrics records")
    # steps between evals (0: only at the end)
    eval_interval: int = bounded(0, at_least=0, what="steps between evals; 0: only at the end")
    # held-out problems per eval
    eval_samples: int = bounded(64, at_least=1, what="held-out problems per eval")
    # steps between checkpoints (0: none)
    save_interval: int = bounded(0, at_least=0, what="steps between checkpoints; 0: none")
    # newest checkpoints kept (the last good one is never deleted)
    keep_checkpoints: int = bounded(3, at_least=1, what="newest checkpoints kept")
    async_save: bool = False  # write step checkpoints in a forked process while training goes on
    resume: str = "auto"  # auto (latest good checkpoint of run.dir) | none | PATH
    # NaN/Inf steps in a row before saving a bad-state checkpoint and stopping
    max_bad_steps: int = bounded(3, at_least=1, what="NaN/Inf steps in a row before stopping")
    recompute: str = one_of("none", "selective", "full")  # activation recomputation
    recompute_method: str = one_of("uniform", "block")  # how layers are grouped (full recompute)
    # layers per recompute unit (full recompute)
    recompute_num_layers: int = bounded(1, at_least=1, what="layers per recompute unit")


@dataclass
class TaskConfig:
    seed: int = 0  # problem generator seed (independent of the run seed)
    min_ops: int = 1  # fewest operators per problem
    max_ops: int = 2  # most operators per problem
    max_operand: int = 9  # operands are 1..max_operand


@dataclass
class FidelityGateConfig:
    enabled: bool = False  # score the SFT data against `reference` before training starts
    reference: Optional[str] = None  # JSONL of traces in the target style
    # lowest acceptable mean trace score
    min_dataset_score: float = bounded(0.0, at_least=0, at_most=1, what="a fidelity score, 0..1")
    # traces below this count as off-style (and are dropped by `filter`)
    min_trace_score: float = bounded(0.0, at_least=0, at_most=1, what="a fidelity score, 0..1")
    # filter: train on the traces that pass; warn: log and go on; fail: stop the run
    action: str = one_of("filter", "warn", "fail", default="warn")


@dataclass
class DataConfig:
    # the built-in arithmetic task, a JSONL file, or megatron indexed datasets (preprocess)
    source: str = one_of("task", "jsonl", "indexed")
    path: Optional[str] = None  # JSONL file of {"prompt", "response"} when source=jsonl
    valid_path: Optional[str] = None  # held-out JSONL for the eval loss (optional)
    tokenizer: str = "byte"  # byte | path to a HF tokenizers JSON file
    # training problems drawn from the task
    num_samples: int = bounded(20000, at_least=1, what="training problems drawn from the task")
    pack: bool = True  # pack several examples into one sequence
    # packed examples attend only within themselves, positions restarting at 0 (sdpa or local
    # attention, or ring attention under parallel.cp > 1); false lets them see each other
    isolate_documents: bool = True
    loss_on_prompt: bool = False  # SFT masks the prompt; pretrain sets this true
    on_malformed: str = one_of("error", "skip")  # a bad line stops, or is counted and reported
    # an example longer than train.seq_len + 1 tokens is cut, left out, or stops the run
    overlong: str = one_of("truncate", "drop", "error")
    # source=indexed: [weight, PREFIX, weight, PREFIX, ...] or [PREFIX, ...] (.bin/.idx pairs)
    blend: List[str] = field(default_factory=list)
    # source=indexed: train, held-out and test shares of every dataset of the blend
    split: List[float] = field(default_factory=lambda: [98.0, 2.0, 0.0])
    cache_dir: Optional[str] = None  # source=indexed: sample indices; cache/ beside the data
    task: TaskConfig = field(default_factory=TaskConfig)
    fidelity_gate: FidelityGateConfig = field(default_factory=FidelityGateConfig)  # SFT data check


@dataclass
class ClusterConfig:
    name: str = one_of("local", "slurm")  # processes on this machine, or a SLURM job
    nodes: int = bounded(1, at_least=1)  # nodes
    gpus_per_node: int = 0  # GPUs per node (0: CPU processes)
    tasks_per_node: int = 0  # processes per node (0: gpus_per_node, or nproc locally)
    cpus_per_task: int = bounded(1, at_least=1)  # CPU cores per process
    time: str = "01:00:00"  # wall-clock limit
    partition: Optional[str] = None  # SLURM partition
    account: Optional[str] = None  # SLURM account
    qos: Optional[str] = None  # SLURM QoS
    exclusive: bool = False  # whole nodes
    constraint: Optional[str] = None  # SLURM node features
    container_image: Optional[str] = None  # pyxis/enroot image
    container_mounts: Optional[str] = None  # pyxis mounts
    extra_sbatch: List[str] = field(default_factory=list)  # raw extra #SBATCH lines
    env: List[str] = field(default_factory=list)  # KEY=VALUE exported in the job
    signal_seconds: int = bounded(120, at_least=0)  # USR1 this many seconds before the time limit
    max_requeues: int = bounded(3, at_least=0)  # give up after this many requeues


@dataclass
class LoggingConfig:
    backend: str = one_of("wandb", "none")  # W&B run logging, or metrics.jsonl only
    project: str = "megatron-ext"  # W&B project
    entity: Optional[str] = None  # W&B entity
    group: Optional[str] = None  # W&B group
    tags: List[str] = field(default_factory=list)  # W&B tags
    mode: str = one_of("offline", "online")  # W&B mode (WANDB_MODE in the environment wins)
    # steps between GPU stats records (0: off)
    nvml_interval: int = bounded(10, at_least=0, what="steps between GPU stats; 0: off")
    verbose: bool = False  # show megatron's and torch's warnings (hidden; one fallbacks line)


@dataclass
class GenerateConfig:
    checkpoint: Optional[str] = None  # our checkpoint to generate with (else model=hf's weights)
    prompts: Optional[str] = None  # JSONL of {"prompt": str} or {"messages": [...]} records
    out: Optional[str] = None  # JSONL written: prompt, response, token_ids, logprobs, finish_reason
    max_new_tokens: int = bounded(64, at_least=1, what="tokens generated per prompt")
    temperature: float = bounded(0.0, at_least=0, what="sampling temperature; 0: greedy")
    top_p: float = bounded(1.0, at_least=0, at_most=1, what="nucleus mass; 1: off")
    # auto: "messages" through the chat template, plain prompts as they are; true: both; false: none
    chat_template: str = one_of("auto", "true", "false", "True", "False")
    # sequence slots the engine holds at once (bounds its KV cache); the prompts go in batches
    # of this many (one progress line each; DP replicas take whole batches)
    max_batch: int = bounded(64, at_least=1, what="sequence slots of the generation engine")
    # ours: models/generate.py; megatron: megatron-core's DynamicInferenceEngine (CUDA and
    # flash-attn >= 2.7.3; unverified); auto: megatron where it can run, else ours
    engine: str = one_of("auto", "ours", "megatron")
    # our engine's decode steps replayed from CUDA graphs; auto: when the model is on CUDA
    cuda_graphs: str = one_of("auto", "true", "false", "True", "False")


@dataclass
class RunConfig:
    dir: Optional[str] = None  # run directory; outputs/<name>-<time> when unset
    name: str = "run"  # run name (W&B too)


@dataclass
class Config:
    stage: str = one_of("pretrain", "sft", "rl", default="sft")  # what the run trains
    seed: int = 1234  # every random choice of the run follows from it
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # GRPO/PPO settings (stage=rl)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)  # python -m megatron_ext.generate

    @property
    def isolates_documents(self) -> bool:
        """Whether training rows pack several documents that attend only within themselves
        (data.pack and data.isolate_documents, on the JSONL / task rows of SFT and pretraining;
        megatron's indexed datasets and RL build their own rows)."""
        d = self.data
        return d.pack and d.isolate_documents and d.source != "indexed" and self.stage != "rl"
