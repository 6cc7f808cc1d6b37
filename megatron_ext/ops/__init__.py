"""Fused kernels for training: linear cross-entropy without logits, SwiGLU with recompute.

Each op has a C++ (CPU), a CUDA and a pure-PyTorch implementation; `backend()` says which
one serves now and `set_backend()` forces one (tests, benchmarks); `resolve_fused()` reads
model.fused_loss / model.fused_swiglu for the device a run trains on.
"""

from megatron_ext.ops._backend import (FusedConfigError, available_backends, backend,
                                       resolve_fused, set_backend)
from megatron_ext.ops.fused_ce import fused_linear_cross_entropy
from megatron_ext.ops.swiglu import swiglu

__all__ = [
    "FusedConfigError",
    "available_backends",
    "backend",
    "fused_linear_cross_entropy",
    "resolve_fused",
    "set_backend",
    "swiglu",
]
