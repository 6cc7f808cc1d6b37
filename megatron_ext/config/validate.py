"""Checks a config against the world it will run in; each error names the field and the fix."""
from __future__ import annotations

import dataclasses
import os

from parallel.topology import LayoutError, ParallelDims
from megatron_ext.config.schema import Config
from megatron_ext.rl.config import check_rl_config


class ConfigError(ValueError):
    """A config value that cannot work."""


_CHOICES = {
    "stage": ("pretrain", "sft", "rl"),
    "model.dtype": ("fp32", "bf16"),
    "model.attention_backend": ("auto", "sdpa", "flash", "local", "te"),
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "train.recompute": ("none", "selective", "full"),
    "train.recompute_method": ("uniform", "block"),
    "data.source": ("task", "jsonl"),
    "data.on_malformed": ("error", "skip"),
    "cluster.name": ("local", "slurm"),
    "logging.backend": ("wandb", "none"),
    "logging.mode": ("offline", "online"),
}


# Lower bounds of numeric fields: (least value, what the field is).
_AT_LEAST = {
    "train.steps": (1, "optimizer steps"),
    "train.seq_len": (1, "tokens per sample"),
    "train.global_batch_size": (1, "samples per optimizer step"),
    "model.num_layers": (1, "transformer layers"),
    "model.hidden_size": (1, "model width"),
    "model.num_attention_heads": (1, "query heads"),
    "model.num_query_groups": (1, "KV heads"),
    "model.ffn_hidden_size": (1, "SwiGLU inner width"),
    "model.vocab_size": (0, "0 follows the tokenizer"),
    "model.max_position_embeddings": (1, "longest sequence RoPE is built for"),
    "model.make_vocab_size_divisible_by": (1, "embedding padding"),
    "train.warmup_steps": (0, "linear warm-up steps"),
    "train.log_interval": (1, "steps between metrics records"),
    "train.eval_interval": (0, "steps between evals; 0: only at the end"),
    "train.eval_samples": (1, "held-out problems per eval"),
    "train.save_interval": (0, "steps between checkpoints; 0: none"),
    "train.keep_checkpoints": (1, "newest checkpoints kept"),
    "train.max_bad_steps": (1, "NaN/Inf steps in a row before stopping"),
    "train.recompute_num_layers": (1, "layers per recompute unit"),
    "train.clip_grad": (0, "grad-norm clip; 0 disables"),
    "train.weight_decay": (0, "AdamW weight decay"),
    "data.num_samples": (1, "training problems drawn from the task"),
    "parallel.timeout_s": (1, "seconds a collective waits for a missing rank"),
    "logging.nvml_interval": (0, "steps between GPU stats; 0: off"),
}


def _unknown_keys(node, prefix: str = ""):
    """Keys a `+key=value` override added beside the schema's fields: Hydra accepts them (it
    even suggests `+` when a key is unknown) and the trainer would silently ignore them."""
    fields = {f.name for f in dataclasses.fields(node)}
    for name, value in vars(node).items():
        if name not in fields:
            yield f"{prefix}{name}", sorted(fields)
        elif dataclasses.is_dataclass(value):
            yield from _unknown_keys(value, f"{prefix}{name}.")


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_rl(cfg: Config) -> None:
    """stage=rl: the rl section's own rules, a starting checkpoint and a verifiable task."""
    try:
        check_rl_config(cfg.rl)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    path = cfg.rl.init_checkpoint
    if not path or not os.path.isdir(path):
        raise ConfigError(f"rl.init_checkpoint={path!r} is not a checkpoint folder; stage=rl "
                          "starts from an SFT run's weights: give rl.init_checkpoint="
                          "<sft run>/checkpoints/step_N")
    if cfg.data.source != "task":
        raise ConfigError(f"data.source={cfg.data.source!r}: stage=rl needs prompts with a "
                          "verifiable answer; use data=task")
    if cfg.parallel.cp > 1:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp}: stage=rl generates one token per "
                          "step, which context parallelism cannot split; set parallel.cp=1")


def validate(cfg: Config, world_size: int, *, have_fused_norms: bool = False) -> ParallelDims:
    """Raise ConfigError (or LayoutError) for the first broken rule; return the layout."""
    for key, known in _unknown_keys(cfg):
        section = key.rsplit(".", 1)[0] if "." in key else "the top level"
        raise ConfigError(f"unknown config key {key}: {section} has no such field, so the "
                          f"value would be ignored; remove it or use one of "
                          f"{', '.join(known)}")
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(choices)}; "
                              "pick one of these")
    m, t = cfg.model, cfg.train
    for key, (low, what) in _AT_LEAST.items():
        if _get(cfg, key) < low:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= {low} ({what}); set it to "
                              f"{low} or more")
    if m.kv_channels is not None and m.kv_channels < 1:
        raise ConfigError(f"model.kv_channels={m.kv_channels} must be >= 1 (head dim) or null "
                          "(hidden_size / heads)")
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
                          f"min_lr={t.min_lr}); change train.lr or train.min_lr")
    if cfg.stage == "rl":
        _check_rl(cfg)
    if t.resume not in ("auto", "none") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume={t.resume!r} is neither auto, none nor a checkpoint "
                          "folder; give a checkpoints/step_N path")
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
    return dims


__all__ = ["ConfigError", "LayoutError", "validate"]
