"""megatron core-attention modules for our layer spec, and the choice among them.

``model.attention_backend`` names the kernel: ``sdpa`` (torch scaled_dot_product_attention:
flash / memory-efficient / cuDNN on GPU, the flash kernel on CPU), ``flash`` (flash-attn),
``local`` (megatron's unfused DotProductAttention, the reference), ``te`` (TransformerEngine's
spec) and ``auto`` (TE on a GPU where it imports, else flash-attn where it imports and the
model is bf16, else sdpa). With CP > 1 the core attention is ring attention, whose block
kernel follows the same choice (``local``: the PyTorch reference; otherwise torch's fused ops).
Packed documents (data.isolate_documents) reach the core attention as ``attention_mask``: the
dense block-diagonal mask at CP=1 (sdpa, local), the whole row's document ids under CP (ring
attention masks each of its blocks from them); see ``packed_attention_mask``.

Plain nn.Modules (megatron handles those in state dicts; there are no parameters), so importing
this file does not import megatron, which costs seconds in every process."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from parallel.context import default_cp_group
from parallel.ring_attention import ring_attention

BACKENDS = ("auto", "sdpa", "flash", "local", "te")


def resolve_backend(name: str, dtype: str, documents: bool = False) -> str:
    """The backend that ``model.attention_backend=name`` runs here; ``dtype`` is model.dtype.
    With ``documents`` (isolated packed documents, a mask) ``auto`` is sdpa, which takes one.

    Raises ValueError for a name this machine or dtype cannot run."""
    from megatron_ext.compat import has_flash_attn, has_transformer_engine

    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not one of {', '.join(BACKENDS)}; "
                         "pick one of these")
    if name == "auto" and documents:
        return "sdpa"
    if name == "auto":
        if has_transformer_engine():
            return "te"
        return "flash" if has_flash_attn() and dtype == "bf16" else "sdpa"
    if name == "te" and not has_transformer_engine():
        raise ValueError("model.attention_backend=te but TransformerEngine does not import here "
                         "(it needs a GPU and the transformer-engine package); use "
                         "model.attention_backend=auto or sdpa")
    if name == "flash":
        if not has_flash_attn():
            raise ValueError("model.attention_backend=flash but flash_attn does not import here "
                             "(it needs a GPU and the flash-attn package); use "
                             "model.attention_backend=auto or sdpa")
        if dtype != "bf16":
            raise ValueError(f"model.attention_backend=flash with model.dtype={dtype}: flash-attn "
                             "computes in fp16/bf16 only; set model.dtype=bf16 or "
                             "model.attention_backend=sdpa")
    return name


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed documents, megatron's convention (True = masked out):
    `[b, s]` document ids -> `[b, 1, s, s]`, where a query sees the earlier keys of its own
    document only (causal and block-diagonal)."""
    s = document_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return ~(same & causal).unsqueeze(1)


def packed_attention_mask(document_ids: torch.Tensor, cp: int) -> torch.Tensor:
    """What the model's core attention takes as ``attention_mask`` for packed documents: the
    dense ``document_mask`` at CP=1, the `[b, s]` document ids of the whole row under CP (the
    ring builds each block's mask from them; a dense mask has no meaning on zigzag shards)."""
    return document_mask(document_ids) if cp == 1 else document_ids


def ring_kernel(backend: str) -> str:
    """The ring attention block kernel that goes with a resolved backend."""
    return "torch" if backend == "local" else "sdpa"


class _CoreAttention(torch.nn.Module):
    """What our core attentions share: megatron's DotProductAttention constructor, its checks
    of what they do not implement, and the causal flag of a call."""

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
        name = type(self).__name__
        self.config = config
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"{name}: attention dropout {dropout} is not implemented; set "
                "attention_dropout=0.0 in the TransformerConfig."
            )
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError(
                f"{name}: softmax_type={config.softmax_type!r}, window_size="
                f"{config.window_size}; only vanilla softmax without a window is supported."
            )
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.layer_number = max(1, layer_number)
        # apply_query_key_layer_scaling only moves a factor between scores and softmax in
        # DotProductAttention; the product stays 1/sqrt(hn).
        self.softmax_scale = (
            1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        )

    def _causal(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        """True for a causal call, False for an unmasked one. With a causal mask type the
        explicit ``attention_mask`` is ignored, as with TE: the causal pattern is implied."""
        name = type(self).__name__
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(
                f"{name} supports neither packed sequences (packed_seq_params) nor "
                "attention_bias; pass None, or use TE's attention for THD packing."
            )
        from megatron.core.transformer.enums import AttnMaskType  # loaded with the config

        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type == AttnMaskType.causal:
            return True
        if mask_type == AttnMaskType.no_mask or (
            mask_type == AttnMaskType.padding and attention_mask is None
        ):
            return False
        raise ValueError(
            f"{name}: attn_mask_type={mask_type.name} with an explicit mask is not supported; "
            "use AttnMaskType.causal or AttnMaskType.no_mask."
        )


def _refuse_document_mask(module, attention_mask) -> None:
    if attention_mask is not None:
        raise ValueError(f"{type(module).__name__} cannot isolate packed documents (a document "
                         "mask); use model.attention_backend=sdpa or local with parallel.cp=1, "
                         "or data.isolate_documents=false")


class SDPACoreAttention(_CoreAttention):
    """Megatron ``core_attention`` on torch.nn.functional.scaled_dot_product_attention.

    q [sq, b, np, hn], k and v [sk, b, ng, hn] (ng divides np: GQA without repeating kv heads)
    -> [sq, b, np*hn]. The causal mask is bottom-right aligned when sq != sk (a KV-cache decode
    step sees every cached key), as megatron's local attention does for one new token.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        sq, b, heads, hn = query.shape
        sk = key.shape[0]
        mask = None
        if attention_mask is not None and causal and sq == sk:  # packed documents (document_mask)
            mask, causal = ~attention_mask, False
        elif causal and 1 < sq != sk:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(sq, sk)
        # [b, h, s, d] views; made contiguous on a CPU, whose flash kernel is ~10% faster (fwd
        # + bwd) on dense inputs, the copies included, with the same bits; CUDA's kernels take
        # the strided views as they are, and a copy there would only cost memory bandwidth
        dense = query.device.type == "cpu"
        out = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3).contiguous() if dense else t.permute(1, 2, 0, 3)
              for t in (query, key, value)),
            attn_mask=mask,
            is_causal=causal and sq == sk and sq > 1,
            scale=self.softmax_scale,
            enable_gqa=key.shape[2] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)


class FlashCoreAttention(_CoreAttention):
    """Megatron ``core_attention`` on flash-attn's ``flash_attn_func`` (fp16/bf16 on CUDA).

    Same contract as SDPACoreAttention; flash-attn aligns the causal mask bottom-right and
    takes GQA kv heads as they are."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        from flash_attn import flash_attn_func

        self._flash_attn_func = flash_attn_func

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        _refuse_document_mask(self, attention_mask)
        if query.dtype not in (torch.float16, torch.bfloat16) or not query.is_cuda:
            raise ValueError(
                f"FlashCoreAttention got {query.dtype} on {query.device}: flash-attn runs fp16 "
                "or bf16 on CUDA; set model.dtype=bf16 or model.attention_backend=sdpa."
            )
        sq, b = query.shape[:2]
        out = self._flash_attn_func(
            *(t.transpose(0, 1) for t in (query, key, value)),  # [b, s, h, d]
            dropout_p=0.0, softmax_scale=self.softmax_scale, causal=causal,
        )
        return out.transpose(0, 1).reshape(sq, b, -1)


class RingCoreAttention(_CoreAttention):
    """Megatron ``core_attention`` that runs ring attention over the CP group.

    Same contract as SDPACoreAttention, on zigzag shards (a full [s, s] mask has no meaning
    there): ``attention_mask`` is None or, for packed documents, the `[b, s]` integer document
    ids of the whole row (``packed_attention_mask``). At CP size 1 it is plain blockwise
    attention. ``kernel`` is the block kernel of ``parallel.attention_block`` ("sdpa" or
    "torch"); bind it with functools.partial in a spec.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None, kernel: str = "sdpa"):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout, softmax_scale)
        if cp_comm_type not in (None, "p2p"):
            raise ValueError(
                f"RingCoreAttention: cp_comm_type={cp_comm_type!r}; ring attention is the 'p2p' "
                "scheme. Set cp_comm_type to 'p2p' or leave it unset."
            )
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = default_cp_group() if cp_group is None else cp_group
        self.kernel = kernel

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        if attention_mask is not None and (attention_mask.dim() != 2
                                           or attention_mask.is_floating_point()
                                           or attention_mask.dtype == torch.bool):
            raise ValueError(
                f"RingCoreAttention got an attention_mask of shape {tuple(attention_mask.shape)} "
                f"and dtype {attention_mask.dtype}; it takes the [b, s] integer document ids of "
                "the whole row (models.attention.packed_attention_mask), not a dense mask")
        sq, b = query.shape[:2]
        out = ring_attention(
            *(t.transpose(0, 1) for t in (query, key, value)),  # [b, s, h, d]
            causal=causal,
            softmax_scale=self.softmax_scale,
            group=self.cp_group,
            kernel=self.kernel,
            document_ids=attention_mask,
        )
        return out.transpose(0, 1).reshape(sq, b, -1)
