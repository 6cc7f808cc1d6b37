"""SwiGLU with recompute: autograd keeps only x; the backward kernel recomputes sigmoid(a) and
silu(a) while it forms the gradients, saving the [..., d] activations a plain
`F.silu(a) * b` would keep (two extra tensors of x's half size per MLP)."""

import torch

from megatron_ext.ops._backend import kernels_for


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels):
        ctx.save_for_backward(x)
        ctx.kernels = kernels
        return kernels.impl.swiglu_forward(x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return ctx.kernels.impl.swiglu_backward(x, dy.to(x.dtype).contiguous()), None


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b where a, b = x.chunk(2, dim=-1); keeps only x for backward."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension [..., 2*d] (gate, value); got "
                         f"shape {tuple(x.shape)}; check the fc1 width of the gated MLP")
    return _SwiGLU.apply(x.contiguous(), kernels_for(x))
