"""megatron-core 0.16.1's RoPE hook without TransformerEngine: `config.apply_rope_fusion` makes
rope_utils.apply_rotary_pos_emb call `rope_utils.fused_apply_rotary_pos_emb(t, freqs,
interleaved=)`, which is TE's kernel or None. Where it is None, ours (megatron_ext.ops.rope)
goes there, so the attention's two RoPE calls per layer are one autograd node each instead of
megatron's unfused chain; interleaved or partial rotary still take megatron's unfused path."""
from __future__ import annotations

import torch


def _fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_ext.ops.rope import apply_rope
    if interleaved or freqs.size(-1) != t.size(-1):
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return apply_rope(t, freqs)


def install_fused_rope() -> bool:
    """Put our RoPE where megatron looks for TE's when TE's is absent. True when ours serves
    `apply_rope_fusion` (set the config flag then); False when TE's is there (left alone)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _fused_rope
    return rope_utils.fused_apply_rotary_pos_emb is _fused_rope
