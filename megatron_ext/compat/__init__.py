"""Optional-dependency detection and the CPU bridge for megatron-core."""
from __future__ import annotations

import importlib.util
import warnings

import torch

from megatron_ext.compat.cpu import install as install_cpu_bridge


def has_module(name: str) -> bool:
    """True when `name` imports. TransformerEngine raises RuntimeError (not ImportError) on a
    machine without cuDNN, so any exception means "not usable"."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken optional install is an absent one
        return False
    return True


def has_transformer_engine() -> bool:
    return torch.cuda.is_available() and has_module("transformer_engine")


def has_apex() -> bool:
    """NVIDIA apex (not the unrelated PyPI web toolkit of the same name)."""
    return torch.cuda.is_available() and has_module("apex.normalization")


def has_flash_attn() -> bool:
    return torch.cuda.is_available() and has_module("flash_attn")


# Warnings megatron-core 0.16.1 (and torch 2.13 under it) print on every rank of every run, each
# saying something the fallbacks line says once or nothing a user can act on:
# (message, category, module of the warn call, CPU only). Install before megatron is imported.
_MEGATRON = r"megatron\.core\."
_EXPECTED_WARNINGS = (
    # import time (megatron.core.optimizer, clip_grads, models.backends, gpt_layer_specs, fsdp):
    # the missing kernel libraries, named by the fallbacks line
    (r"(Apex is|Transformer Engine and Apex are) not installed", UserWarning, _MEGATRON, False),
    # model build: TransformerConfig's own default cuda_graph_scope="full" trips its deprecation
    (r"full scope is deprecated", UserWarning, _MEGATRON, False),
    # first TP forward (tensor_parallel/layers.py): a CUDA stream setting, moot without CUDA
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", UserWarning, _MEGATRON, True),
    # first TP all-gather / reduce-scatter: megatron calls the names torch 2.13 renamed
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     FutureWarning, r"torch\.distributed\.", False),
    # each step with parallel.use_distributed_optimizer (optimizer.py _zero_grad_group_helper
    # reads .grad of its shard views)
    (r"The \.grad attribute of a Tensor that is not a leaf", UserWarning, _MEGATRON, False),
    # checkpoint load (dist_checkpointing/strategies/torch.py): megatron's calls into torch DCP
    (r"`load_state_dict` is deprecated", FutureWarning, _MEGATRON, False),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning,
     r"torch\.distributed\.", False),
)


def setup(verbose: bool = False) -> str:
    """Install what this machine needs and return the device type to train on. Unless
    `verbose`, silence the expected megatron warnings first (every rank calls this before
    megatron is imported; the run says once which fallbacks are active instead)."""
    cpu = not torch.cuda.is_available()
    for message, category, module, cpu_only in () if verbose else _EXPECTED_WARNINGS:
        if cpu or not cpu_only:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    if install_cpu_bridge():
        return "cpu"
    return "cuda"


def has_nvml() -> bool:
    """NVML answers, so GPU stats can be sampled (pynvml without a driver raises)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, no pynvml, no driver, ...
        return False
    return True


def fallback_line(watch_gpus: bool) -> str:
    """One line naming what this process runs without; `watch_gpus`: GPU stats were asked for."""
    from megatron_ext.ops import backend  # here: compat sits below ops and loads first
    te, apex = has_transformer_engine(), has_apex()
    active = []
    if not te:
        active.append("no TransformerEngine (megatron local layer spec)" if apex else
                      "no TransformerEngine/apex (megatron local layer spec, torch norms and "
                      "optimizer)")
    if not torch.cuda.is_available():
        active.append("CPU bridge for megatron-core")
    active.append({"cuda": "", "cpp": "C++ kernels", "torch": "torch reference kernels"}[backend()])
    if watch_gpus and not has_nvml():
        active.append("no NVML (no GPU stats)")
    return "fallbacks: " + (", ".join(a for a in active if a) or "none")


__all__ = ["setup", "fallback_line", "has_module", "has_nvml", "has_transformer_engine", "has_apex",
           "has_flash_attn"]
