"""Which implementation serves megatron_ext.ops: the CUDA extension, the C++ extension or the
PyTorch reference; and whether the model uses our fused ops at all (`resolve_fused`).

Extensions load once, at import. A missing or broken build warns in one line and the
reference serves, so a machine without a compiler still trains (slower, same numbers). On a
GPU the reference is slower than megatron's own loss and SwiGLU, so `model.fused_*=auto` uses
megatron's there instead.
"""

import importlib
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from megatron_ext.ops import reference

BACKENDS = ("cuda", "cpp", "torch")
BUILD_COMMAND = "pip install -e . --no-build-isolation"  # builds csrc/ (CUDA too, with nvcc)
_FIX = f"rebuild with `{BUILD_COMMAND}` and read its error"


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
    warnings.warn(f"megatron_ext.ops: CUDA extension unavailable ({_cuda_err}); CUDA tensors "
                  f"given to these ops use the PyTorch reference; {_FIX}", RuntimeWarning,
                  stacklevel=2)


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


# model.fused_loss / model.fused_swiglu: what each setting means, and megatron's op that serves
# when ours does not.
FUSED_SETTINGS = ("auto", "true", "false")
_MEGATRON_OP = {"fused_loss": "megatron's vocab-parallel cross-entropy",
                "fused_swiglu": "megatron's own SwiGLU"}


class FusedConfigError(ValueError):
    """model.fused_*=true where our kernels cannot serve it fast."""


@dataclass(frozen=True)
class FusedChoice:
    """Whether the model uses our op; `reason` says what serves; `notice` is the one line to
    print at start when `auto` fell back to megatron's op (empty otherwise)."""

    use: bool
    reason: str
    notice: str = ""


def resolve_fused(key: str, setting, device_type: str, *,
                  cuda_built: bool | None = None) -> FusedChoice:
    """The one reading of model.<key> (fused_loss or fused_swiglu) for a run on device_type.

    CPU: auto = true (C++ kernels, or the PyTorch reference without the C++ build). GPU with
    the CUDA extension: auto = true. GPU without it: auto uses megatron's op and says so; true
    is a FusedConfigError naming the build command. `setting` takes auto/true/false in any
    case or a bool (Hydra turns a typed `true` into "True"); `cuda_built` overrides whether the
    CUDA extension loaded here (tests).
    """
    if key not in _MEGATRON_OP:
        raise ValueError(f"unknown fused op {key!r}; one of {', '.join(_MEGATRON_OP)}")
    value = str(setting).lower()
    if value not in FUSED_SETTINGS:
        raise FusedConfigError(f"model.{key}={setting!r} is not one of "
                               f"{', '.join(FUSED_SETTINGS)}; pick one of these")
    ours = "our fused " + ("linear cross-entropy" if key == "fused_loss" else "SwiGLU")
    if value == "false":
        return FusedChoice(False, f"{_MEGATRON_OP[key]} (model.{key}=false)")
    if device_type != "cuda":
        impl = "C++ kernels" if _KERNELS["cpp"] is not None else "PyTorch reference (no C++ build)"
        return FusedChoice(True, f"{ours}, {impl}")
    built = _KERNELS["cuda"] is not None if cuda_built is None else cuda_built
    if built:
        return FusedChoice(True, f"{ours}, CUDA kernels")
    why = f"the CUDA extension megatron_ext.ops._C_cuda is not built ({_cuda_err or 'absent'})"
    if value == "true":
        raise FusedConfigError(f"model.{key}=true on a GPU needs our CUDA kernels, but {why}. "
                               f"Build it with `{BUILD_COMMAND}` on a machine with nvcc and a "
                               f"CUDA torch, or set model.{key}=auto to use {_MEGATRON_OP[key]}")
    reason = f"{_MEGATRON_OP[key]} (model.{key}=auto: {why})"
    return FusedChoice(False, reason, f"model.{key}=auto uses {reason}; `{BUILD_COMMAND}` "
                                      f"builds our kernels")
