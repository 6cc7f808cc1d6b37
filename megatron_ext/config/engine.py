"""Which generation engine runs (`generate.engine`, `rl.engine`: auto | ours | megatron) and why
megatron-core's DynamicInferenceEngine cannot run somewhere, and whether our engine decodes from
CUDA graphs (`generate.cuda_graphs`, `rl.cuda_graphs`); the rules live here so that config
validation (before any process starts) and the engine choice at run time apply the same ones.

megatron's engine is CUDA-only (its context tensors, sampler generator and PP communication)
and its dynamic-batching attention asserts flash-attn >= 2.7.3; models/megatron_engine.py says
what the adapter serves. `auto` picks it only where none of the rules below blocks it."""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_ext.config.fields import ConfigError

MIN_FLASH_ATTN = (2, 7, 3)


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def environment_missing() -> Optional[str]:
    """What this process lacks for megatron's engine (None: nothing): a CUDA device, or
    flash-attn >= 2.7.3."""
    import torch
    if not torch.cuda.is_available():
        return "a CUDA device (megatron's dynamic engine is CUDA-only)"
    try:
        import flash_attn
    except ImportError:
        return "flash-attn >= 2.7.3 (not installed; megatron's dynamic attention asserts it)"
    version = getattr(flash_attn, "__version__", "0")
    if _version(version) < MIN_FLASH_ATTN:
        return f"flash-attn >= 2.7.3 (installed: {version})"
    return None


def option_missing(*, temperature: float, stop: Sequence[str], pp: int, vpp: Optional[int],
                   dtype: str) -> Optional[str]:
    """What of a run's generation settings megatron's engine (through our adapter) does not
    serve (None: all of them). top_p is served: megatron's nucleus keeps the same tokens."""
    if pp > 1 or (vpp or 1) > 1:
        return (f"parallel.pp=1 without vpp (got pp={pp}, vpp={vpp}): the adapter drives one "
                "model chunk; megatron's inference wrapper refuses interleaved chunks")
    if dtype not in ("bf16", "fp16"):
        return f"model.dtype=bf16 (got {dtype}): flash-attn, which its attention uses, has no fp32"
    if temperature not in (0, 1):
        return (f"temperature 0 or 1 (got {temperature:g}): it returns log-probs at "
                "temperature 1 only, and ours are at the sampling temperature")
    if stop:
        return (f"no stop strings (got {list(stop)}): it matches stop words as token ids, "
                "not as text the way ours does")
    return None


def resolve_engine(choice: str, key: str, *, env: Optional[str] = "probe", **options) -> str:
    """'ours' or 'megatron' for `choice` (auto | ours | megatron) of config key `key` given
    the generation settings `options` (option_missing's keywords). env: what the environment
    lacks, "probe" to find out here (environment_missing), or None when it lacks nothing.
    Raises ConfigError when `choice` is megatron and something blocks it."""
    if choice == "ours":
        return "ours"
    missing = option_missing(**options)
    if missing is None:
        missing = environment_missing() if env == "probe" else env
    if missing is None:
        return "megatron"
    if choice == "auto":
        return "ours"
    raise ConfigError(f"{key}=megatron needs {missing}; use {key}=ours (or auto)")


GRAPH_CHOICES = ("auto", "true", "false")


def resolve_cuda_graphs(choice, key: str, missing: Optional[str]) -> bool:
    """Whether our engine decodes from CUDA graphs for `choice` (auto | true | false; Hydra may
    hand a bool or "True") of config key `key`, given what the run lacks for them (`missing`,
    None: nothing; models/decode_graph.py's unsupported). auto: where nothing is missing.
    Raises ConfigError for true where something is."""
    value = str(choice).lower()
    if value not in GRAPH_CHOICES:
        raise ConfigError(f"{key}={choice!r} must be one of {', '.join(GRAPH_CHOICES)}")
    if value == "false" or (value == "auto" and missing is not None):
        return False
    if missing is not None:
        raise ConfigError(f"{key}=true needs {missing}; use {key}=auto (graphs where the model "
                          "is on CUDA) or false")
    return True
