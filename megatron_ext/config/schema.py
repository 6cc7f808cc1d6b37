"""The structured config behind the Hydra yaml tree. Hydra merges every yaml file and override
into these dataclasses, so an unknown key or a wrong type fails before any process starts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.align.gate import FidelityGateConfig
from megatron_ext.rl.config import RLConfig


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, for logs
    source: str = ""  # where the shape comes from (paper, model card, guess)
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # KV heads (grouped-query attention); = heads for MHA
    kv_channels: Optional[int] = None  # head dim; hidden_size / heads when unset
    ffn_hidden_size: int = 256  # SwiGLU inner width (per branch)
    vocab_size: int = 0  # 0: take the tokenizer's vocab size
    make_vocab_size_divisible_by: int = 128  # padding of the embedding (times tp)
    max_position_embeddings: int = 65536  # longest sequence RoPE is built for
    rotary_base: int = 10000  # RoPE theta
    tie_embeddings: bool = False  # share input embedding and output layer
    norm_epsilon: float = 1.0e-5  # RMSNorm epsilon
    init_method_std: float = 0.02  # weight init std
    dtype: str = "fp32"  # parameter/compute dtype: fp32 | bf16
    fused_loss: bool = True  # fused linear cross-entropy instead of materialised logits
    fused_swiglu: bool = True  # our SwiGLU kernel that recomputes in backward
    attention_backend: str = "auto"  # core attention: auto | sdpa | flash | local | te


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    vpp: Optional[int] = None  # virtual pipeline chunks per rank (interleaved 1F1B)
    cp: int = 1  # context parallel size (ring attention)
    sequence_parallel: bool = False  # needs TE or apex norms (refused on CPU)
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (ZeRO-1)
    overlap_grad_reduce: bool = False  # overlap DP grad all-reduce with backward
    timeout_s: int = 600  # process-group timeout: a dead rank ends the job after this


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seq_len: int = 64  # tokens per sample
    micro_batch_size: int = 4  # samples per micro-batch per DP rank
    global_batch_size: int = 16  # samples per optimizer step, all DP ranks together
    lr: float = 1.0e-3  # peak learning rate
    min_lr: float = 1.0e-4  # final learning rate of the cosine decay
    warmup_steps: int = 10  # linear warm-up steps
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1.0e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global grad-norm clip (0 disables)
    log_interval: int = 1  # steps between progress lines / metrics records
    eval_interval: int = 0  # steps between evals (0: only at the end)
    eval_samples: int = 64  # held-out problems per eval
    save_interval: int = 0  # steps between checkpoints (0: none)
    keep_checkpoints: int = 3  # newest checkpoints kept (the last good one is never deleted)
    async_save: bool = False  # write step checkpoints in a forked process while training goes on
    resume: str = "auto"  # auto (latest good checkpoint of run.dir) | none | PATH
    max_bad_steps: int = 3  # NaN/Inf steps in a row before saving a bad-state checkpoint and stopping
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block (full recompute)
    recompute_num_layers: int = 1  # layers per recompute unit (full recompute)


@dataclass
class TaskConfig:
    seed: int = 0  # problem generator seed (independent of the run seed)
    min_ops: int = 1  # fewest operators per problem
    max_ops: int = 2  # most operators per problem
    max_operand: int = 9  # operands are 1..max_operand


@dataclass
class DataConfig:
    source: str = "task"  # task (built-in arithmetic) | jsonl
    path: Optional[str] = None  # JSONL file of {"prompt", "response"} when source=jsonl
    valid_path: Optional[str] = None  # held-out JSONL for the eval loss (optional)
    tokenizer: str = "byte"  # byte | path to a HF tokenizers JSON file
    num_samples: int = 20000  # training problems drawn from the task
    pack: bool = True  # pack several examples into one sequence
    loss_on_prompt: bool = False  # SFT masks the prompt; pretrain sets this true
    on_malformed: str = "error"  # error | skip (skip counts and reports them)
    task: TaskConfig = field(default_factory=TaskConfig)
    fidelity_gate: FidelityGateConfig = field(default_factory=FidelityGateConfig)  # SFT data check


@dataclass
class ClusterConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1  # nodes
    gpus_per_node: int = 0  # GPUs per node (0: CPU processes)
    tasks_per_node: int = 0  # processes per node (0: gpus_per_node, or nproc locally)
    cpus_per_task: int = 1  # CPU cores per process
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
    signal_seconds: int = 120  # USR1 this many seconds before the time limit
    max_requeues: int = 3  # give up after this many requeues


@dataclass
class LoggingConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "megatron-ext"  # W&B project
    entity: Optional[str] = None  # W&B entity
    group: Optional[str] = None  # W&B group
    tags: List[str] = field(default_factory=list)  # W&B tags
    mode: str = "offline"  # offline | online (WANDB_MODE in the environment wins)
    nvml_interval: int = 10  # steps between GPU stats records (0: off)


@dataclass
class RunConfig:
    dir: Optional[str] = None  # run directory; outputs/<name>-<time> when unset
    name: str = "run"  # run name (W&B too)


@dataclass
class Config:
    stage: str = "sft"  # pretrain | sft | rl
    seed: int = 1234  # every random choice of the run follows from it
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # GRPO/PPO settings (stage=rl)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)
