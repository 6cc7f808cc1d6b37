"""Fused kernels for training: linear cross-entropy without logits, SwiGLU with recompute.

Each op has a C++ (CPU), a CUDA and a pure-PyTorch implementation; `backend()` says which
one serves now and `set_backend()` forces one (tests, benchmarks).
"""

from megatron_ext.ops._backend import available_backends, backend, set_backend
from megatron_ext.ops.fused_ce import fused_linear_cross_entropy
from megatron_ext.ops.swiglu import swiglu

__all__ = [
    "available_backends",
    "backend",
    "fused_linear_cross_entropy",
    "set_backend",
    "swiglu",
]
