"""Build megatron-core GPTModel chunks (one per virtual pipeline stage) from our config, wrapped
in megatron DDP. The layer spec is megatron's (TE's when TE imports on a GPU, else the local one)
with the core attention of model.attention_backend."""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.compat import has_transformer_engine
from megatron_ext.compat.rope import install_fused_rope
from megatron_ext.config.schema import Config
from megatron_ext.models.fused_loss import FusedLossGPTModel, VocabGPTModel
from megatron_ext.models.fused_swiglu import apply_fused_swiglu
from megatron_ext.models.attention import (
    FlashCoreAttention,
    RingCoreAttention,
    SDPACoreAttention,
    resolve_backend,
    ring_kernel,
)
from megatron_ext.models.init import initialize_weights, mark_tensor_parallel
from megatron_ext.ops import resolve_fused
from parallel.topology import Topology

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The core attention of each backend at CP = 1; te keeps the TE spec's own.
_CORE_ATTENTION = {"sdpa": SDPACoreAttention, "flash": FlashCoreAttention,
                   "local": DotProductAttention}


def model_vocab_size(cfg: Config, tokenizer) -> int:
    """model.vocab_size, or the tokenizer's when it is 0; never fewer rows than tokens."""
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={vocab_size}; raise model.vocab_size or set it to 0 "
                         "to follow the tokenizer")
    return vocab_size


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the embedding so every TP shard has the same, aligned row count."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_config(cfg: Config, topo: Topology) -> TransformerConfig:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = _DTYPES[m.dtype]
    recompute = {"none": {}, "selective": {"recompute_granularity": "selective"},
                 "full": {"recompute_granularity": "full",
                          "recompute_method": t.recompute_method,
                          "recompute_num_layers": t.recompute_num_layers}}[t.recompute]
    on_gpu = topo.device.type == "cuda"
    vpp = p.vpp if p.vpp and p.vpp > 1 else None
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        qk_layernorm=m.qk_layernorm,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # our one-node RoPE where TE's fused one is absent (compat/rope.py); TE's stays off
        apply_rope_fusion=install_fused_rope(),
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        use_cpu_initialization=not on_gpu,
        # weights are allocated, not drawn: models/init.py draws them once (or a load fills them)
        perform_initialization=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        # PP=2 with interleaving gives silently wrong gradients with batched p2p on gloo.
        batch_p2p_comm=vpp is None,
        overlap_p2p_comm=vpp is not None,
        **recompute,
    )


def layer_spec(cfg: Config) -> Tuple[ModuleSpec, str]:
    """(megatron's GPT layer spec with the core attention of model.attention_backend, a line
    that says which attention runs). The spec is TE's when TE imports on a GPU, else the local
    one; with parallel.cp > 1 its core attention is our ring attention, so CP needs no TE."""
    requested = cfg.model.attention_backend
    backend = resolve_backend(requested, cfg.model.dtype, documents=cfg.isolates_documents)
    if has_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec)
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        spec = get_gpt_layer_local_spec(normalization="RMSNorm",
                                        qk_layernorm=cfg.model.qk_layernorm)
    attention = spec.submodules.self_attention.submodules
    if cfg.parallel.cp > 1:
        kernel = ring_kernel(backend)
        attention.core_attention = functools.partial(RingCoreAttention, kernel=kernel)
        said = f"ring attention over CP={cfg.parallel.cp}, {kernel} block kernel"
    else:
        attention.core_attention = _CORE_ATTENTION.get(backend, attention.core_attention)
        said = backend
    return spec, f"attention: {said} (model.attention_backend={requested})"


def rope_scaling(m) -> dict:
    """GPTModel's RoPE scaling arguments for model.rope_scaling (llama3: megatron's Llama 3.x
    frequency scaling; linear: position interpolation by the factor)."""
    if m.rope_scaling == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": m.rope_scaling_factor}
    if m.rope_scaling == "linear":
        return {"seq_len_interpolation_factor": m.rope_scaling_factor}
    return {}


@functools.lru_cache(maxsize=None)
def _say_once(line: str) -> None:
    """Print a line on global rank 0, the first time only (the reference model and the critic
    build the same layers again)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(line, flush=True)


def build_gpt_chunks(cfg: Config, topo: Topology, vocab_size: int,
                     init: bool = True) -> List[GPTModel]:
    """Unwrapped GPTModel chunks of this rank, in virtual-stage order, with initial weights
    that depend on cfg.seed only (not on the layout). vocab_size: the real vocab; megatron
    pads it, and the padding never enters the loss. init=False leaves the weights
    uninitialised (allocated, never drawn) for a caller that loads every weight right after:
    HF weights, a checkpoint."""
    config = transformer_config(cfg, topo)
    spec, attention = layer_spec(cfg)
    _say_once(attention)
    fused_loss, fused_swiglu = (resolve_fused(key, getattr(cfg.model, key), topo.device.type)
                                for key in ("fused_loss", "fused_swiglu"))
    for notice in filter(None, (fused_loss.notice, fused_swiglu.notice)):
        _say_once(notice)
    if fused_swiglu.use:
        config, spec = apply_fused_swiglu(config, spec)
    model_class = FusedLossGPTModel if fused_loss.use else VocabGPTModel
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = model_class(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded,
            real_vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            **rope_scaling(cfg.model),
            vp_stage=vp_stage,
        )
        chunks.append(model.to(topo.device))
    mark_tensor_parallel(chunks)
    if init:
        initialize_weights(chunks, cfg.seed, vocab_size, topo)
    return chunks


def wrap_ddp(cfg: Config, chunks: List[GPTModel]) -> List[DistributedDataParallel]:
    """Megatron DDP around each chunk; grads are summed (per-token loss) and scaled by the
    global token count in finalize_model_grads."""
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk,
                                disable_bucketing=(i > 0) or not cfg.parallel.overlap_grad_reduce)
        for i, chunk in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()
    config.no_sync_func = [w.no_sync for w in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_model(cfg: Config, topo: Topology, vocab_size: int,
                init: bool = True) -> List[DistributedDataParallel]:
    return wrap_ddp(cfg, build_gpt_chunks(cfg, topo, vocab_size, init))


def count_parameters(chunks) -> int:
    """Parameters of this rank (each TP/PP shard counted once)."""
    return sum(p.numel() for c in chunks for p in c.parameters())
