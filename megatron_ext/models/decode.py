"""The lean KV-cached forward of this rank's model chunks, indexed by sequence slot, for the
generation engine (models/generate.py).

Why not megatron's inference path: its static context holds one batch whose rows all sit at
the same offset, and every token walks GPTModel.forward, TransformerBlock and the layer with
their inference bookkeeping, which on a small model costs more than the arithmetic. Here a
call runs any set of slots, each at its own position (prefill of right-padded prompts, decode
of one token, or a mix), with the very parameters being trained (no copy, no weight sync),
through what megatron's modules compute in eval, with the same ops: megatron's local
Column/RowParallelLinear (the QKV, output projection and MLP linears) as the F.linear (+ TP
all-reduce for the row-parallel ones) they are, megatron's MLP as its fc1 -> activation (our
fused SwiGLU's kernel when configured) -> fc2, torch's RMSNorm/LayerNorm modules (QK-norm
included) as their op, the bias-dropout-adds as the in-place adds they run, and on one TP rank
the embedding as its lookups and the output layer as its F.linear; with TP, the embedding and
the output layer (its TP gather) are called as modules. Their module, autograd-function and
process-group bookkeeping cost more than the arithmetic of a decode step (a layer on 16 rows
of a small model is ~50 aten ops; each Python-level call costs microseconds). Any other class
(TE's), or a module with hooks, is called as the module.
Attention is done here: RoPE at the given positions with megatron's rotary table (llama3 /
linear scaling included) and its rotate-half convention, the new K/V written into the slots'
cache rows, and torch SDPA over the slot's cached prefix and the new tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding)
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  VocabParallelEmbedding)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP

from megatron_ext.models.fused_swiglu import SwiGLUActivation
from megatron_ext.ops._backend import kernels_for


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _layers(models):
    return [layer for model in models for layer in model.decoder.layers]


def _refuse_unsupported(model) -> None:
    """Clear errors for what this forward does not implement, instead of wrong logits."""
    c = model.config
    rules = [
        (c.sequence_parallel, "sequence_parallel=True (a decode step is one token, which "
                              "sequence parallelism cannot split); build the generation model "
                              "with sequence_parallel=False"),
        (c.context_parallel_size > 1, f"context_parallel_size={c.context_parallel_size}; "
                                      "generate with parallel.cp=1"),
        (c.multi_latent_attention, "multi_latent_attention=True"),
        (c.attention_output_gate, "attention_output_gate=True"),
        (c.num_moe_experts, f"num_moe_experts={c.num_moe_experts} (dense MLPs only)"),
        (c.no_rope_freq, "no_rope_freq is set (RoPE on every layer only)"),
        (c.softmax_type != "vanilla", f"softmax_type={c.softmax_type!r}"),
        (c.window_size is not None, f"window_size={c.window_size}"),
        (model.position_embedding_type not in ("rope", "learned_absolute", "none"),
         f"position_embedding_type={model.position_embedding_type!r}"),
    ]
    broken = [rule for bad, rule in rules if bad]
    if broken:
        raise NotImplementedError(f"ChunkDecoder does not support {'; '.join(broken)}")


def _plain(module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _lean_linear(linear):
    """x -> (output, bias to add later) as the megatron linear computes it in eval."""
    if not _plain(linear) or getattr(linear, "sequence_parallel", False):
        return linear
    if type(linear) is ColumnParallelLinear and not linear.gather_output:
        def column(x):
            bias = linear.bias
            if linear.skip_bias_add:
                return F.linear(x, linear.weight), bias
            return F.linear(x, linear.weight, bias), None
        return column
    if (type(linear) is RowParallelLinear and linear.input_is_parallel
            and not linear.explicit_expert_comm):
        group = linear.tp_group
        reduce = group is not None and group.size() > 1

        def row(x):
            out = F.linear(x, linear.weight)
            if reduce:
                dist.all_reduce(out, group=group)
            bias = linear.bias
            if linear.skip_bias_add or bias is None:
                return out, bias
            return out + bias, None
        return row
    return linear


def _lean_norm(norm):
    """torch's RMSNorm / LayerNorm module as its op (the same op, without the module call)."""
    if norm is None or not _plain(norm):
        return norm
    if type(norm) is torch.nn.RMSNorm:
        return lambda x: torch.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)
    if type(norm) is torch.nn.LayerNorm:
        return lambda x: torch.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias,
                                          norm.eps)
    return norm


def _residual_add(out_with_bias, residual):
    """megatron's bias-dropout-add in eval, in place as it runs there: (out + bias) + residual."""
    out, bias = out_with_bias
    if bias is not None:
        out.add_(bias)
    return out.add_(residual if residual.dtype == out.dtype else residual.to(out.dtype))


def _lean_embedding(embedding):
    """(ids [n, t], positions [n, t]) -> [t, n, h] as megatron's LanguageModelEmbedding
    computes it on one TP rank: the word (+ learned position) lookups, transposed; its dropout
    as the module's flag says. None where that is not all it does."""
    words = embedding.word_embeddings
    table = embedding.position_embeddings if embedding.add_position_embedding else None
    c = embedding.config
    if not (type(embedding) is LanguageModelEmbedding and type(words) is VocabParallelEmbedding
            and all(map(_plain, (embedding, words, embedding.embedding_dropout)))
            and words.tp_group.size() == 1 and not words.reduce_scatter_embeddings
            and not embedding.reduce_scatter_embeddings
            and embedding.tokentype_embeddings is None and not c.fp32_residual_connection
            and not c.sequence_parallel
            and (table is None or (type(table) is torch.nn.Embedding and _plain(table)
                                   and table.max_norm is None))):
        return None

    def run(ids, positions):
        x = F.embedding(ids, words.weight)
        if table is not None:
            x = x + F.embedding(positions, table.weight)
        x = x.transpose(0, 1).contiguous()
        dropout = embedding.embedding_dropout
        return dropout(x) if dropout.training and dropout.p > 0 else x
    return run


def _lean_output(layer) -> bool:
    """Whether the output layer computes F.linear(x, weight) and nothing else: a plain
    ColumnParallelLinear without bias on one TP rank (its gather a no-op)."""
    group = layer.tp_group
    return (type(layer) is ColumnParallelLinear and _plain(layer) and layer.bias is None
            and not layer.sequence_parallel and not layer.config.defer_embedding_wgrad_compute
            and (group is None or group.size() == 1))


def _lean_mlp(mlp):
    """x -> (output, bias): megatron's MLP.forward for the dense (gated) MLP of our layer
    specs, whose activation is our fused SwiGLU module or megatron's glu with silu."""
    c = mlp.config
    fc1, fc2 = _lean_linear(mlp.linear_fc1), _lean_linear(mlp.linear_fc2)
    plain = type(mlp) is MLP and _plain(mlp) and fc1 is not mlp.linear_fc1 and (
        fc2 is not mlp.linear_fc2)
    if not plain or c.bias_activation_fusion:
        return mlp
    if c.use_te_activation_func and type(mlp.activation_func) is SwiGLUActivation and (
            _plain(mlp.activation_func)):
        def activation(x):  # our swiglu's kernel, without its autograd function
            return kernels_for(x).impl.swiglu_forward(x.contiguous())
    elif c.use_te_activation_func:
        activation = mlp.activation_func
    elif (c.gated_linear_unit and c.activation_func_clamp_value is None
          and c.glu_linear_offset == 0.0):
        def activation(x):
            gate, linear = torch.chunk(x, 2, dim=-1)
            return c.activation_func(gate) * linear
    elif not c.gated_linear_unit:
        activation = mlp.activation_func
    else:
        return mlp

    def run(x):
        x, bias = fc1(x)
        if bias is not None:
            x = x + bias
        return fc2(activation(x))
    return run


class SlotCache:
    """K and V of this rank's layers for `num_slots` sequences of up to `max_len` tokens.

    `kv`: `[layers, num_slots, max_len + 1, 2 (K, V), kv_heads_per_tp_rank, head_dim]` on the
    model's device and dtype, layers in the order of the chunks (virtual stages) and their
    decoder layers; K and V side by side, so a layer writes and gathers them in one op each.
    Column `max_len` is scratch: the right padding of a call writes there, so it never
    clobbers a cached position and no host sync picks the valid tokens."""

    def __init__(self, chunks, num_slots: int, max_len: int):
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots={num_slots} and max_len={max_len} must be >= 1")
        models = [_unwrap(c) for c in chunks]
        limit = models[0].max_sequence_length
        if max_len > limit:
            raise ValueError(f"max_len={max_len} exceeds the model's max_sequence_length="
                             f"{limit}; generate shorter sequences")
        layers = _layers(models)
        attention = layers[0].self_attention
        weight = attention.linear_qkv.weight
        self.num_slots, self.max_len = num_slots, max_len
        self.layer_index = {id(layer): i for i, layer in enumerate(layers)}
        shape = (len(layers), num_slots, max_len + 1, 2,
                 attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
        self.kv = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    def release(self) -> None:
        """Free the cache memory (before a training step); the cache cannot be used after."""
        self.kv = None

    def check(self) -> None:
        if self.kv is None:
            raise RuntimeError("the SlotCache was released; make a new one to generate again")


class _Layer:
    """One TransformerLayer in eval mode, its pieces resolved once."""

    def __init__(self, layer, index: int):
        attention = layer.self_attention
        self.index = index
        self.norm1, self.norm2 = map(_lean_norm, (layer.input_layernorm, layer.pre_mlp_layernorm))
        self.attention = attention
        # Q/K norms, None for none (megatron's IdentityOp)
        self.q_norm, self.k_norm = (None if isinstance(m, IdentityOp) else _lean_norm(m)
                                    for m in (attention.q_layernorm, attention.k_layernorm))
        self.qkv = _lean_linear(attention.linear_qkv)
        self.proj = _lean_linear(attention.linear_proj)
        self.mlp = _lean_mlp(layer.mlp)
        self.heads = attention.num_attention_heads_per_partition
        self.groups = attention.num_query_groups_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        # megatron's own split where KV heads are fewer than TP ranks (it all-gathers them)
        self.own_split = (self.qkv is not attention.linear_qkv
                          and layer.config.num_query_groups >= attention.world_size)
        # no Q/K norm: attention takes the QKV output whole (RoPE on Q and K in one pass)
        self.joint = self.own_split and self.q_norm is None and self.k_norm is None

    def qkv_heads(self, x):
        """[t, n, h] -> q [t, n, heads, d], k and v [t, n, groups, d], as megatron splits its
        QKV output: per query group [its q heads, k, v], then Q/K norms."""
        attention = self.attention
        if not self.own_split:
            return attention.get_query_key_value_tensors(x)
        mixed, _ = self.qkv(x)
        t, n = x.shape[:2]
        d, per_group = self.head_dim, self.heads // self.groups
        mixed = mixed.view(t, n, self.groups, (per_group + 2) * d)
        query, key, value = torch.split(mixed, [per_group * d, d, d], dim=3)
        query = query.reshape(t, n, self.heads, d)
        if self.q_norm is not None:
            query = self.q_norm(query)
        if self.k_norm is not None:
            key = self.k_norm(key)
        return query, key, value

    def __call__(self, hidden, attend):
        x = self.norm1(hidden)
        if self.joint:
            mixed, _ = self.qkv(x)
            t, n = x.shape[:2]
            heads = mixed.view(t, n, self.groups, self.heads // self.groups + 2, self.head_dim)
            out = self.proj(attend.joint(self.index, heads))
        else:
            out = self.proj(attend(self.index, *self.qkv_heads(x)))
        hidden = _residual_add(out, hidden)
        return _residual_add(self.mlp(self.norm2(hidden)), hidden)


class ChunkDecoder:
    """Runs this rank's chunks (as build_gpt_chunks returns them, DDP-wrapped or not) on a
    batch of slots of a SlotCache. Calls run under no_grad and do not change the chunks'
    training flag: put them in eval mode (the layers' bias-dropout-adds run without dropout
    anyway; the embedding's dropout follows the flag)."""

    def __init__(self, chunks, cache: SlotCache):
        self.models = [_unwrap(c) for c in chunks]
        for model in self.models:
            _refuse_unsupported(model)
        layers = _layers(self.models)
        if len(cache.layer_index) != len(layers) or any(
                id(layer) not in cache.layer_index for layer in layers):
            raise ValueError("the SlotCache was made for other chunks; make it from the same "
                             "chunks as the ChunkDecoder")
        self.cache = cache
        model = self.models[0]
        config = model.config
        self.scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.interleaved = config.rotary_interleaved
        self.layers = [[_Layer(layer, cache.layer_index[id(layer)])
                        for layer in m.decoder.layers] for m in self.models]
        self.final_norms = [_lean_norm(m.decoder.final_layernorm) for m in self.models]
        self.lean_output = [m.post_process and _lean_output(m.output_layer) for m in self.models]
        self.embeddings = [_lean_embedding(m.embedding) if m.pre_process else None
                           for m in self.models]
        self.rope = None
        if model.position_embedding_type == "rope":
            # [max_len + 1, 3, 1, d]: cos, sin and the sin that multiplies x with its halves
            # swapped (rotate-half's sign folded in) of the frequencies training uses at every
            # position (a table of megatron's rotary module, whose get_emb applies the llama3
            # / linear scaling)
            freqs = model.rotary_pos_emb.get_emb(cache.max_len + 1)[:, 0]
            sin = torch.sin(freqs)
            half = sin.shape[-1] // 2
            self.rope = torch.stack((torch.cos(freqs), sin, torch.cat(
                (-sin[..., :half], sin[..., half:]), dim=-1)), dim=1)

    @torch.no_grad()
    def forward(self, v: int, inputs, slots: torch.Tensor, positions: torch.Tensor,
                lengths: torch.Tensor, kv_len: Optional[int] = None,
                view: Optional[slice] = None) -> torch.Tensor:
        """Run chunk v on a batch of n slots.

        inputs: token ids `[n, t]` (long) if chunk v is pre_process, else the previous stage's
        hidden `[t, n, h]` (megatron layout). slots: `[n]` slot of each row (distinct).
        positions: `[n, t]` absolute positions (prefill: 0..t-1, right-padded; decode: t=1,
        the slot's current length; a continued prefill: the next positions). lengths: `[n]`
        valid tokens of each row in this call (>= 1; right padding beyond, whose positions
        may be anything). Writes K/V of the valid positions into the slots' cache rows and
        attends causally to the slot's cached prefix and the new tokens.
        kv_len: how many cache positions to attend over, at least every row's last position
        + 1 (the engine knows it); None computes it from the tensors, a host sync on GPU.
        view: when `slots` are exactly the cache's slots `range(num_slots)[view]`, in order
        (a whole group of the engine), attention reads their K/V as a view, not a gather.
        Returns hidden `[t, n, h]` for a non-last chunk, or fp32 logits `[n, vocab]` of each
        row's LAST valid position gathered over TP when chunk v is the post_process chunk;
        vocab is megatron's padded vocab (model.vocab_size): cut it to the real one to sample.
        """
        self.cache.check()
        model = self.models[v]
        n, t = positions.shape
        if slots.shape != (n,) or lengths.shape != (n,):
            raise ValueError(f"slots {tuple(slots.shape)} and lengths {tuple(lengths.shape)} "
                             f"must both be [n] = [{n}] for positions {tuple(positions.shape)}")
        last = lengths - 1 if t > 1 or kv_len is None else None
        if kv_len is None:
            kv_len = int(positions.gather(1, last[:, None]).max()) + 1
            if kv_len > self.cache.max_len:
                raise ValueError(f"a position reaches {kv_len - 1}, beyond the cache's "
                                 f"max_len={self.cache.max_len}")
        elif not 1 <= kv_len <= self.cache.max_len:
            raise ValueError(f"kv_len={kv_len} must be in [1, max_len={self.cache.max_len}]")
        if model.pre_process:
            if inputs.shape != (n, t):
                raise ValueError(f"chunk {v} takes token ids [n, t] = [{n}, {t}], got "
                                 f"{tuple(inputs.shape)}")
            # learned positions: the padding's positions may lie past the table
            at = (positions.clamp(0, self.cache.max_len - 1)
                  if model.position_embedding_type == "learned_absolute" else positions)
            embed = self.embeddings[v]
            hidden = (embed(inputs, at) if embed is not None else
                      model.embedding(input_ids=inputs, position_ids=at))
        else:
            if inputs.shape[:2] != (t, n):
                raise ValueError(f"chunk {v} takes the previous stage's hidden [t, n, h] = "
                                 f"[{t}, {n}, h], got {tuple(inputs.shape)}")
            hidden = inputs
        if view is not None and len(range(self.cache.num_slots)[view]) != n:
            raise ValueError(f"view={view} selects {len(range(self.cache.num_slots)[view])} "
                             f"of {self.cache.num_slots} slots, not the n={n} rows")
        attend = _Attend(self, slots, positions, lengths, kv_len, hidden.dtype, view)
        for layer in self.layers[v]:
            hidden = layer(hidden, attend)
        norm = self.final_norms[v]
        if not model.post_process:
            return hidden if norm is None else norm(hidden)
        if t > 1:  # (a call of one token per row has it already)
            hidden = hidden[last, torch.arange(n, device=hidden.device)][None]  # [1, n, h]
        if norm is not None:
            hidden = norm(hidden)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        if self.lean_output[v]:
            logits = F.linear(hidden, model.output_layer.weight if weight is None else weight)
        else:
            logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[0].float()

    __call__ = forward


class _Attend:
    """The attention of every layer in one call, and what they share: the RoPE cos/sin of
    each token, its cache address, the additive causal key mask, the K/V cache views."""

    def __init__(self, decoder: ChunkDecoder, slots, positions, lengths, kv_len: int, dtype,
                 view: Optional[slice]):
        cache = decoder.cache
        device = positions.device
        n, t = positions.shape
        where = positions.clamp(0, cache.max_len)
        self.rotary, self.interleaved = decoder.rope is not None, decoder.interleaved
        if self.rotary:
            # [t, n, 1, d] each, as megatron's apply_rotary_pos_emb; [t * n, 1, 1, d] for
            # a QKV output [t * n, groups, heads per group, d]
            self.cos, sin, signed = decoder.rope[where.t()].to(dtype).unbind(2)
            self.sin = sin if self.interleaved else signed
            self.flat = [x.reshape(t * n, 1, *x.shape[2:]) for x in (self.cos, self.sin)]
        width = cache.max_len + 1
        # flat rows of a [num_slots * (max_len + 1)] view; padding goes to the scratch column
        if t > 1:
            valid = torch.arange(t, device=device)[None] < lengths[:, None]
            positions = torch.where(valid, positions, cache.max_len)
        self.rows = (slots[:, None] * width + positions).view(-1)
        self.slots, self.view = slots, view
        keys = torch.arange(kv_len, device=device)
        # [n, 1, t, kv_len]: SDPA's own conversion of a boolean mask, once for all layers
        self.mask = torch.zeros((n, 1, t, kv_len), dtype=dtype, device=device).masked_fill_(
            (keys > where[:, :, None])[:, None], float("-inf"))
        # [layers, slots, 2 (K, V), groups, kv_len, d]: each layer's K and V as SDPA reads them
        self.kv = cache.kv[:, :, :kv_len].permute(0, 1, 3, 4, 2, 5)
        if view is not None:
            self.kv = self.kv[:, view]
        self.cache, self.scale = cache, decoder.scale

    def _rope(self, x, out=None, flat: bool = False):
        """megatron's _apply_rotary_pos_emb_bshd with this call's cos/sin (mscale 1), into
        `out` when given; x `[t, n, heads, d]`, or `[t * n, ...]` when flat. Not interleaved,
        rotate-half(x) * sin is x with its halves swapped times the signed sin."""
        cos, sin = self.flat if flat else (self.cos, self.sin)
        rot = cos.shape[-1]
        if rot < x.shape[-1]:  # rotary_percent < 1: the rest passes through
            rotated = torch.cat((self._rope(x[..., :rot], flat=flat), x[..., rot:]), dim=-1)
            return rotated if out is None else out.copy_(rotated)
        turned = (_rotate_half(x, True) if self.interleaved else
                  torch.roll(x, rot // 2, dims=-1))
        return torch.add(x * cos, turned * sin, out=out)

    def __call__(self, index: int, query, key, value):
        """query [t, n, heads, d], key and value [t, n, groups, d] -> [t, n, heads * d]."""
        if self.rotary:
            query, key = self._rope(query), self._rope(key)
        self._write(index, torch.stack((key, value), dim=2).transpose(0, 1))
        return self._sdpa(index, query.permute(1, 2, 0, 3))

    def joint(self, index: int, mixed):
        """The QKV output as megatron lays it out, `[t, n, groups, heads per group + 2 (K, V),
        d]` (a fresh tensor: RoPE overwrites its Q and K in place) -> [t, n, heads * d]."""
        t, n, groups, per_group, d = mixed.shape
        per_group -= 2
        if self.rotary:
            qk = mixed.view(t * n, groups, per_group + 2, d)[:, :, :per_group + 1]
            self._rope(qk, out=qk, flat=True)
        self._write(index, mixed[:, :, :, per_group:].permute(1, 0, 3, 2, 4))
        query = mixed[:, :, :, :per_group].permute(1, 2, 3, 0, 4).reshape(
            n, groups * per_group, t, d)
        return self._sdpa(index, query)

    def _write(self, index: int, new):
        """new `[n, t, 2, groups, d]` K/V into this layer's cache rows."""
        n, t = new.shape[:2]
        cache = self.cache.kv[index]  # [slots, max_len + 1, 2, groups, d]
        cache.view(-1, *cache.shape[2:]).index_copy_(
            0, self.rows, new.reshape(n * t, *new.shape[2:]).to(cache.dtype))

    def _sdpa(self, index: int, query):
        """query `[n, heads, t, d]` over the layer's cached keys -> [t, n, heads * d]."""
        n, heads, t, d = query.shape
        both = self.kv[index]  # [n (or slots), 2, groups, kv_len, d]
        if self.view is None:
            both = both.index_select(0, self.slots)
        keys, values = both[:, 0], both[:, 1]
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=self.mask, scale=self.scale,
            enable_gqa=keys.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(t, n, heads * d)
