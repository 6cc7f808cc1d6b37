"""The model's shape and parameter list per pipeline rank, as megatron_ext.models.gpt builds it.

The parameter list follows GPTModel's module order, because megatron's grad buffers (and so
the distributed optimizer's shards and padding) are laid out in that order.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

from megatron_ext.config.schema import Config

DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """megatron_ext.models.gpt.padded_vocab_size, restated so planning never imports megatron
    (seconds per process); the measured tests check the two agree through the parameter count."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Per-TP-rank sizes. `heads`/`groups` are per TP rank; `vocab` is the padded shard."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    full_heads: int
    tie: bool
    dtype_bytes: int

    @classmethod
    def of(cls, cfg: Config, vocab_size: int) -> "ModelShape":
        m, tp = cfg.model, cfg.parallel.tp
        head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
        vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
        return cls(layers=m.num_layers, hidden=m.hidden_size,
                   heads=m.num_attention_heads // tp, groups=m.num_query_groups // tp,
                   head_dim=head_dim, ffn=m.ffn_hidden_size // tp, vocab=vocab // tp,
                   full_heads=m.num_attention_heads, tie=m.tie_embeddings,
                   dtype_bytes=DTYPE_BYTES[m.dtype])


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    numel: int
    nbytes_per_elem: int  # storage dtype of the parameter
    shared_embedding: bool = False  # megatron puts it in its own grad bucket (tied, PP > 1)


def layer_params(shape: ModelShape, index: int, te_spec: bool) -> List[Param]:
    """One transformer layer. The local spec's torch RMSNorm keeps an fp32 weight whatever
    params_dtype is; TE fuses the norms into the following linear in params_dtype."""
    h, e, p = shape.hidden, shape.dtype_bytes, f"decoder.layers.{index}."
    qkv = (shape.heads + 2 * shape.groups) * shape.head_dim * h
    proj = h * shape.heads * shape.head_dim
    if te_spec:
        return [Param(p + "self_attention.linear_proj.weight", proj, e),
                Param(p + "self_attention.linear_qkv.weight", qkv, e),
                Param(p + "self_attention.linear_qkv.layer_norm_weight", h, e),
                Param(p + "mlp.linear_fc1.weight", 2 * shape.ffn * h, e),
                Param(p + "mlp.linear_fc1.layer_norm_weight", h, e),
                Param(p + "mlp.linear_fc2.weight", h * shape.ffn, e)]
    return [Param(p + "input_layernorm.weight", h, 4),
            Param(p + "self_attention.linear_proj.weight", proj, e),
            Param(p + "self_attention.linear_qkv.weight", qkv, e),
            Param(p + "pre_mlp_layernorm.weight", h, 4),
            Param(p + "mlp.linear_fc1.weight", 2 * shape.ffn * h, e),
            Param(p + "mlp.linear_fc2.weight", h * shape.ffn, e)]


def chunk_params(shape: ModelShape, layers: range, first: bool, last: bool, pp: int,
                 te_spec: bool) -> List[Param]:
    """Parameters of one model chunk (a pipeline stage, or one virtual stage of it)."""
    h, e = shape.hidden, shape.dtype_bytes
    shared = shape.tie and pp > 1
    params: List[Param] = []
    if first:
        params.append(Param("embedding.word_embeddings.weight", shape.vocab * h, e, shared))
    for index in layers:
        params += layer_params(shape, index, te_spec)
    if last:
        params.append(Param("decoder.final_layernorm.weight", h, e if te_spec else 4))
        if not (shape.tie and first):  # a tied output layer on the first stage is the embedding
            params.append(Param("output_layer.weight", shape.vocab * h, e, shared))
    return params


def stage_chunks(shape: ModelShape, pp: int, vpp: int,
                 pp_rank: int) -> List[Tuple[range, bool, bool]]:
    """(layer indices, holds the embedding, holds the output layer) of each chunk of a rank.
    Megatron gives chunk c of rank r the layers of virtual stage c*pp + r."""
    per_chunk = shape.layers // (pp * vpp)
    chunks = []
    for c in range(vpp):
        stage = c * pp + pp_rank
        chunks.append((range(stage * per_chunk, (stage + 1) * per_chunk), stage == 0,
                       stage == pp * vpp - 1))
    return chunks
