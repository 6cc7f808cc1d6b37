"""megatron core-attention adapters for our layer spec: ring attention over the CP group.

A plain nn.Module (megatron handles those in state dicts; there are no parameters), so
importing this file does not import megatron, which costs seconds in every process."""
from __future__ import annotations

import math
from typing import Optional

import torch

from parallel.context import default_cp_group
from parallel.ring_attention import ring_attention


class RingCoreAttention(torch.nn.Module):
    """Megatron ``core_attention`` that runs ring attention over the CP group.

    Drop-in for DotProductAttention in a layer spec: takes q [sq, b, np, hn] and k, v
    [sk, b, ng, hn], returns [sq, b, np*hn]. At CP size 1 it is plain blockwise attention.
    With a causal mask type the explicit ``attention_mask`` is ignored, as with TE: the causal
    pattern is implied, and a full [s, s] mask has no meaning on a zigzag shard.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__()
        self.config = config
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"RingCoreAttention: attention dropout {dropout} is not implemented by ring "
                "attention; set attention_dropout=0.0 in the TransformerConfig."
            )
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(
                f"RingCoreAttention: softmax_type={config.softmax_type!r}, window_size="
                f"{config.window_size}; only vanilla softmax without a window is supported."
            )
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(
                f"RingCoreAttention: cp_comm_type={cp_comm_type!r}; ring attention is the 'p2p' "
                "scheme. Set cp_comm_type to 'p2p' or leave it unset."
            )
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.layer_number = max(1, layer_number)
        # apply_query_key_layer_scaling only moves a factor between scores and softmax in
        # DotProductAttention; the product stays 1/sqrt(hn).
        self.softmax_scale = (
            1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        )
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = default_cp_group() if cp_group is None else cp_group

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                "RingCoreAttention supports neither packed sequences (packed_seq_params) nor "
                "attention_bias; pass None, or use TE's attention for THD packing."
            )
        from megatron.core.transformer.enums import AttnMaskType  # loaded with the config

        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type == AttnMaskType.causal:
            causal = True
        elif mask_type == AttnMaskType.no_mask or (
            mask_type == AttnMaskType.padding and attention_mask is None
        ):
            causal = False
        else:
            raise ValueError(
                f"RingCoreAttention: attn_mask_type={mask_type.name} with an explicit mask is "
                "not supported; use AttnMaskType.causal or AttnMaskType.no_mask."
            )
        sq, b = query.shape[:2]
        out = ring_attention(
            query.transpose(0, 1),
            key.transpose(0, 1),
            value.transpose(0, 1),
            causal=causal,
            softmax_scale=self.softmax_scale,
            group=self.cp_group,
        )
        return out.transpose(0, 1).reshape(sq, b, -1)
