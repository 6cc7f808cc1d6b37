"""Checks a config against the world it will run in; each error names the field and the fix."""
from __future__ import annotations

import os

from parallel.topology import LayoutError, ParallelDims
from megatron_ext.config.schema import Config


class ConfigError(ValueError):
    """A config value that cannot work."""


_CHOICES = {
    "stage": ("pretrain", "sft", "rl"),
    "model.dtype": ("fp32", "bf16"),
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "train.recompute": ("none", "selective", "full"),
    "train.recompute_method": ("uniform", "block"),
    "data.source": ("task", "jsonl"),
    "data.on_malformed": ("error", "skip"),
    "cluster.name": ("local", "slurm"),
    "logging.backend": ("wandb", "none"),
    "logging.mode": ("offline", "online"),
}


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config, world_size: int, *, have_fused_norms: bool = False) -> ParallelDims:
    """Raise ConfigError (or LayoutError) for the first broken rule; return the layout."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(choices)}")
    m, t = cfg.model, cfg.train
    for key in ("train.steps", "train.seq_len", "model.num_layers", "model.hidden_size",
                "model.num_attention_heads", "model.num_query_groups", "model.ffn_hidden_size"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}; each KV head serves a whole group")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.kv_channels or change the sizes")
    if t.seq_len > m.max_position_embeddings:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}; raise it or shorten seq_len")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0 (got lr={t.lr}, "
                          f"min_lr={t.min_lr})")
    if cfg.stage == "rl":
        raise ConfigError("stage=rl (GRPO/PPO) is not implemented yet; use stage=pretrain or "
                          "stage=sft")
    if t.resume not in ("auto", "none") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume={t.resume!r} is neither auto, none nor a checkpoint "
                          "folder; give a checkpoints/step_N path")
    for key in ("train.save_interval", "train.keep_checkpoints", "train.max_bad_steps"):
        if _get(cfg, key) < (0 if key == "train.save_interval" else 1):
            raise ConfigError(f"{key}={_get(cfg, key)} is out of range")
    if cfg.data.fidelity_gate.enabled and cfg.data.source != "jsonl":
        raise ConfigError("data.fidelity_gate checks JSONL SFT data; set data=jsonl "
                          "data.path=... or data.fidelity_gate.enabled=false")
    if cfg.data.source == "jsonl" and not cfg.data.path:
        raise ConfigError("data.source=jsonl needs data.path=/path/to/train.jsonl")
    p = cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp)
    dims.validate(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_query_groups=m.num_query_groups, seq_len=t.seq_len,
                  global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                  sequence_parallel=p.sequence_parallel, have_fused_norms=have_fused_norms)
    if p.cp > 1:
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism (ring attention) is not "
                          "wired into the model yet; set parallel.cp=1")
    return dims


__all__ = ["ConfigError", "LayoutError", "validate"]
