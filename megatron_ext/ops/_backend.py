"""Which implementation serves megatron_ext.ops: the CUDA extension, the C++ extension or the
PyTorch reference.

Extensions load once, at import. A missing or broken build warns in one line and the
reference serves, so a machine without a compiler still trains (slower, same numbers).
"""

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from megatron_ext.ops import reference

BACKENDS = ("cuda", "cpp", "torch")
_FIX = "rebuild with `pip install -e . --no-build-isolation` and read its WARNING line"


def _load(name: str):
    try:
        return importlib.import_module(f"megatron_ext.ops.{name}"), None
    except ImportError as err:
        return None, err


_cpp, _cpp_err = _load("_C")
_cuda, _cuda_err = _load("_C_cuda") if torch.cuda.is_available() else (None, None)
if _cpp is None:
    warnings.warn(f"megatron_ext.ops: C++ extension unavailable ({_cpp_err}); CPU tensors use "
                  f"the PyTorch reference; {_FIX}", RuntimeWarning, stacklevel=2)
if torch.cuda.is_available() and _cuda is None:
    warnings.warn(f"megatron_ext.ops: CUDA extension unavailable ({_cuda_err}); CUDA tensors use "
                  f"the PyTorch reference; {_FIX}", RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class Kernels:
    """One implementation and its default tile: [block_rows, chunk_cols] logits at a time."""

    name: str
    impl: ModuleType
    block_rows: int
    chunk_cols: int


# Tiles: cpp fits a fp32 tile in L2 (2 MiB); torch's 4 MiB tile bounds its per-tile
# temporaries while amortising Python overhead; cuda keeps GEMMs large enough to fill the GPU
# (64M elements, 128 MiB in bf16).
_KERNELS = {
    "cuda": Kernels("cuda", _cuda, 4096, 16384) if _cuda is not None else None,
    "cpp": Kernels("cpp", _cpp, 512, 1024) if _cpp is not None else None,
    "torch": Kernels("torch", reference, 1024, 1024),
}
_forced: str | None = None


def available_backends() -> list[str]:
    """Backends that can serve on this machine, best first."""
    return [name for name in BACKENDS if _KERNELS[name] is not None]


def set_backend(name: str | None) -> str | None:
    """Force one backend (tests, benchmarks) or restore automatic choice with None.

    Returns the previous setting so callers can restore it.
    """
    global _forced
    if name is not None and name not in available_backends():
        raise ValueError(f"backend {name!r} is not available here; available: "
                         f"{available_backends()}; pick one of those or None for automatic")
    previous, _forced = _forced, name
    return previous


def kernels_for(tensor: torch.Tensor) -> Kernels:
    """The implementation for this tensor's device and dtype.

    Automatic choice: the CUDA extension for CUDA tensors of fp32/bf16/fp16, the C++ extension
    for CPU tensors, else the reference. A forced backend must suit the device.
    """
    on_cuda = tensor.device.type == "cuda"
    if _forced is not None:
        if (_forced == "cuda") != on_cuda and _forced != "torch":
            raise ValueError(f"backend {_forced!r} cannot serve a tensor on {tensor.device}; "
                             "call set_backend(None) or move the tensor")
        return _KERNELS[_forced]
    if on_cuda:
        usable = _KERNELS["cuda"] is not None and tensor.dtype != torch.float64
        return _KERNELS["cuda"] if usable else _KERNELS["torch"]
    if tensor.device.type == "cpu" and _KERNELS["cpp"] is not None:
        return _KERNELS["cpp"]
    return _KERNELS["torch"]


def backend() -> str:
    """The implementation serving fp32 tensors on the default device (CUDA when present)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return kernels_for(torch.empty(0, device=device)).name
