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


def setup() -> str:
    """Install what this machine needs and return the device type to train on."""
    # megatron announces each missing optional kernel library at import; on a CPU machine
    # that is expected, so keep the log for what matters.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    if install_cpu_bridge():
        return "cpu"
    return "cuda"


__all__ = ["setup", "has_module", "has_transformer_engine", "has_apex", "has_flash_attn"]
