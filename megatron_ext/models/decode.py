"""The lean KV-cached forward of this rank's model chunks, indexed by sequence slot, for the
generation engine (models/generate.py).

Why not megatron's inference path: its static context holds one batch whose rows all sit at
the same offset, and every token walks GPTModel.forward, TransformerBlock and the layer with
their inference bookkeeping, which on a small model costs more than the arithmetic. Here a
call runs any set of slots, each at its own position (prefill of right-padded prompts, decode
of one token, or a mix), through megatron's own sub-modules with the very parameters being
trained (no copy, no weight sync): the embedding, each TransformerLayer's norms, QKV
projection (QK-norm included), output projection, MLP (our fused SwiGLU when configured) and
bias-dropout-adds, the final norm and the output layer, which do their own TP communication.
Only attention is done here: RoPE at the given positions with megatron's apply_rotary_pos_emb
and the model's rotary table (llama3 / linear scaling included), the new K/V written into the
slots' cache rows, and torch SDPA over the slot's cached prefix and the new tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


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


class SlotCache:
    """K and V of this rank's layers for `num_slots` sequences of up to `max_len` tokens.

    `key` and `value`: `[layers, num_slots, kv_heads_per_tp_rank, max_len + 1, head_dim]` on
    the model's device and dtype, layers in the order of the chunks (virtual stages) and
    their decoder layers. Column `max_len` is scratch: the right padding of a call writes
    there, so it never clobbers a cached position and no host sync picks the valid tokens."""

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
        shape = (len(layers), num_slots, attention.num_query_groups_per_partition, max_len + 1,
                 attention.hidden_size_per_attention_head)
        self.key = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.value = torch.zeros_like(self.key)

    def release(self) -> None:
        """Free the cache memory (before a training step); the cache cannot be used after."""
        self.key = self.value = None

    def check(self) -> None:
        if self.key is None:
            raise RuntimeError("the SlotCache was released; make a new one to generate again")


class ChunkDecoder:
    """Runs this rank's chunks (as build_gpt_chunks returns them, DDP-wrapped or not) on a
    batch of slots of a SlotCache. Calls run under no_grad; the chunks' training flag is not
    changed (dropout must be 0, as in our configs: the bias-dropout-adds run in eval mode)."""

    def __init__(self, chunks, cache: SlotCache):
        self.models = [_unwrap(c) for c in chunks]
        for model in self.models:
            _refuse_unsupported(model)
        if len(cache.layer_index) != len(_layers(self.models)) or any(
                id(layer) not in cache.layer_index for layer in _layers(self.models)):
            raise ValueError("the SlotCache was made for other chunks; make it from the same "
                             "chunks as the ChunkDecoder")
        self.cache = cache
        model = self.models[0]
        config = model.config
        self.scale = config.softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.add = get_bias_dropout_add(False, config.bias_dropout_fusion)
        rotary = getattr(model, "rotary_pos_emb", None)
        # [max_len + 1, 1, d]: the frequencies training uses at every position (a table of
        # megatron's rotary module, whose get_emb applies the llama3 / linear scaling)
        self.rope = (rotary.get_emb(cache.max_len + 1)[:, 0]
                     if model.position_embedding_type == "rope" else None)

    @torch.no_grad()
    def forward(self, v: int, inputs, slots: torch.Tensor, positions: torch.Tensor,
                lengths: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
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
        last = lengths - 1
        if kv_len is None:
            kv_len = int(positions.gather(1, last[:, None]).max()) + 1
            if kv_len > self.cache.max_len:
                raise ValueError(f"a position reaches {kv_len - 1}, beyond the cache's "
                                 f"max_len={self.cache.max_len}")
        if model.pre_process:
            if inputs.shape != (n, t):
                raise ValueError(f"chunk {v} takes token ids [n, t] = [{n}, {t}], got "
                                 f"{tuple(inputs.shape)}")
            hidden = model.embedding(input_ids=inputs, position_ids=positions)
        else:
            if inputs.shape[:2] != (t, n):
                raise ValueError(f"chunk {v} takes the previous stage's hidden [t, n, h] = "
                                 f"[{t}, {n}, h], got {tuple(inputs.shape)}")
            hidden = inputs
        attend = _Attend(self, slots, positions, lengths, kv_len)
        for layer in model.decoder.layers:
            hidden = self._layer(layer, hidden, attend)
        norm = model.decoder.final_layernorm
        if not model.post_process:
            return hidden if norm is None else norm(hidden)
        hidden = hidden[last, torch.arange(n, device=hidden.device)][None]  # [1, n, h]
        if norm is not None:
            hidden = norm(hidden)
        weight = (model.shared_embedding_or_output_weight()
                  if model.share_embeddings_and_output_weights else None)
        logits, _ = model.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[0].float()

    __call__ = forward

    def _layer(self, layer, hidden, attend):
        """TransformerLayer.forward in eval mode, with our attention core."""
        attention = layer.self_attention
        query, key, value = attention.get_query_key_value_tensors(layer.input_layernorm(hidden))
        out = attention.linear_proj(attend(layer, query, key, value))
        hidden = self.add(out, hidden, layer.hidden_dropout)
        out = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return self.add(out, hidden, layer.hidden_dropout)


class _Attend:
    """What every layer's attention of one call shares: RoPE frequencies, cache addresses,
    the causal key mask."""

    def __init__(self, decoder: ChunkDecoder, slots, positions, lengths, kv_len: int):
        cache = decoder.cache
        device = positions.device
        n, t = positions.shape
        valid = torch.arange(t, device=device)[None] < lengths[:, None]
        where = positions.clamp(0, cache.max_len)
        self.freqs = None if decoder.rope is None else decoder.rope[where.t()]  # [t, n, 1, d]
        self.slots = slots
        self.rows = slots[:, None].expand(n, t)
        self.columns = torch.where(valid, positions, cache.max_len)  # padding: the scratch column
        keys = torch.arange(kv_len, device=device)
        self.mask = (keys <= where[:, :, None])[:, None]  # [n, 1, t, kv_len]
        self.kv_len, self.cache, self.decoder = kv_len, cache, decoder

    def __call__(self, layer, query, key, value):
        """query [t, n, heads, d], key and value [t, n, groups, d] -> [t, n, heads * d]."""
        config = layer.config
        if self.freqs is not None:
            query = apply_rotary_pos_emb(query, self.freqs, config=config)
            key = apply_rotary_pos_emb(key, self.freqs, config=config)
        i = self.cache.layer_index[id(layer)]
        k_cache, v_cache = self.cache.key[i], self.cache.value[i]  # [slots, g, max_len + 1, d]
        k_cache[self.rows, :, self.columns] = key.transpose(0, 1).to(k_cache.dtype)
        v_cache[self.rows, :, self.columns] = value.transpose(0, 1).to(v_cache.dtype)
        keys = k_cache[:, :, :self.kv_len].index_select(0, self.slots)  # [n, g, kv_len, d]
        values = v_cache[:, :, :self.kv_len].index_select(0, self.slots)
        t, n, heads, d = query.shape
        out = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3), keys, values, attn_mask=self.mask,
            scale=self.decoder.scale, enable_gqa=keys.shape[1] != heads)
        return out.permute(2, 0, 1, 3).reshape(t, n, heads * d)
