"""Every rule a config must pass, checked against the world it will run in before any process
starts: the choices and bounds on the fields, the rules between fields, the paths it names,
the stage=rl rules and the parallel layout. Each error names the field and the fix."""
from __future__ import annotations

import os
from typing import Optional

from megatron_ext.config.engine import resolve_cuda_graphs, resolve_engine
from megatron_ext.config.fields import ConfigError, check_fields
from megatron_ext.config.hf import model_fields
from megatron_ext.config.layout import ParallelDims
from megatron_ext.config.rl import check_rl
from megatron_ext.config.schema import Config


def _need_file(key: str, path: Optional[str], fix: str) -> None:
    if not path:
        raise ConfigError(f"{key} is unset; {fix}")
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"{key}={path!r} {what}; {fix}")


def _check_model_and_train(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
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
    if t.resume not in ("auto", "none") and not os.path.isdir(t.resume):
        raise ConfigError(f"train.resume={t.resume!r} is neither auto, none nor a checkpoint "
                          "folder; give a checkpoints/step_N path")


def _check_blend(cfg: Config) -> None:
    """data=indexed: the blend names existing .bin/.idx pairs (with positive weights when it
    has weights) and data.split gives training a share."""
    d = cfg.data
    fix = "give data.blend='[0.7,data/a,0.3,data/b]' or '[data/a]' (preprocess writes them)"
    if not d.blend:
        raise ConfigError(f"data.source=indexed needs data.blend; {fix}")
    weighted = len(d.blend) % 2 == 0 and len(d.blend) > 1
    prefixes = d.blend[1::2] if weighted else d.blend
    if weighted:
        for w in d.blend[0::2]:
            try:
                ok = float(w) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"data.blend weight {w!r} is not a positive number; {fix}")
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data.blend prefix {prefix!r}: {prefix + ext} does not exist; "
                                  "run python -m megatron_ext.data.preprocess --output-prefix "
                                  f"{prefix} first, or fix the path")
    if len(d.split) != 3 or min(d.split) < 0 or d.split[0] <= 0:
        raise ConfigError(f"data.split={list(d.split)} must be three shares [train, held-out, "
                          "test], none negative and train > 0, e.g. [98,2,0]")


def _check_data(cfg: Config) -> None:
    """The files the run reads exist: a missing one would fail only after the processes and
    the run directory exist."""
    d = cfg.data
    if d.tokenizer != "byte" and os.path.isdir(d.tokenizer):
        if not any(os.path.isfile(os.path.join(d.tokenizer, n))
                   for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ConfigError(f"data.tokenizer={d.tokenizer!r} is a folder without "
                              "tokenizer.json / tokenizer_config.json; copy the model's "
                              "tokenizer files there or give data.tokenizer=PATH")
    elif d.tokenizer != "byte":
        _need_file("data.tokenizer", d.tokenizer, "give a tokenizer.json path or "
                   "data.tokenizer=byte")
    if d.source == "indexed":
        _check_blend(cfg)
    if d.source == "jsonl":
        if not d.path:
            raise ConfigError("data.source=jsonl needs data.path=/path/to/train.jsonl")
        _need_file("data.path", d.path, 'give a JSONL file of {"prompt", "response"} lines')
        if d.valid_path:
            _need_file("data.valid_path", d.valid_path,
                       "give a held-out JSONL file, or data.valid_path=null for no eval loss")
    if cfg.train.steps == 0 and cfg.stage != "rl" and (
            (d.source == "jsonl" and not d.valid_path)
            or (d.source == "indexed" and (len(d.split) < 2 or d.split[1] <= 0))):
        raise ConfigError("train.steps=0 only evaluates, but the run has no held-out data; "
                          "give data.valid_path (data=jsonl) or a held-out share in data.split "
                          "(data=indexed), or train.steps > 0")
    if cfg.isolates_documents and cfg.parallel.cp == 1 and cfg.model.attention_backend in (
            "flash", "te"):
        raise ConfigError(
            f"data.isolate_documents=true masks attention per packed document, which "
            f"model.attention_backend={cfg.model.attention_backend} does not do at parallel.cp=1;"
            " use model.attention_backend=auto, sdpa or local (or parallel.cp > 1: ring "
            "attention), or data.isolate_documents=false")
    gate = d.fidelity_gate
    if gate.enabled:
        if d.source != "jsonl":
            raise ConfigError("data.fidelity_gate checks JSONL SFT data; set data=jsonl "
                              "data.path=... or data.fidelity_gate.enabled=false")
        _need_file("data.fidelity_gate.reference", gate.reference,
                   "point it at a JSONL of target-style traces or set "
                   "data.fidelity_gate.enabled=false")


def _check_rl_stage(cfg: Config) -> None:
    """stage=rl: the rl section's rules, a starting checkpoint and what rollouts can run on."""
    check_rl(cfg.rl)
    path = cfg.rl.init_checkpoint
    if cfg.model.hf_path and not path:
        pass  # model=hf: the policy (and reference) start from the HF weights
    elif not path or not os.path.isdir(path):
        raise ConfigError(f"rl.init_checkpoint={path!r} is not a checkpoint folder; stage=rl "
                          "starts from an SFT run's weights: give rl.init_checkpoint="
                          "<sft run>/checkpoints/step_N, or model=hf model.hf_path=DIR")
    if cfg.data.source == "indexed":
        raise ConfigError("data.source=indexed: stage=rl needs prompts with a verifiable "
                          'answer; use data=task, or data=jsonl with {"prompt", "answer"} lines')
    if cfg.data.source == "jsonl":
        _need_file("data.valid_path", cfg.data.valid_path, 'stage=rl evaluates (and guards) on '
                   'held-out problems: give a JSONL of {"prompt", "answer"} lines')
    if cfg.parallel.cp > 1:
        raise ConfigError(f"parallel.cp={cfg.parallel.cp}: stage=rl generates one token per "
                          "step, which context parallelism cannot split; set parallel.cp=1")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:  # at tp=1 it is off anyway
        raise ConfigError("parallel.sequence_parallel=true: stage=rl generates one token per "
                          "step, which sequence parallelism cannot split; set "
                          "parallel.sequence_parallel=false")


def _check_engines(cfg: Config, probe: bool) -> None:
    """generate.engine / rl.engine=megatron can run with these settings (and, when `probe`,
    in this process's environment: CUDA, flash-attn)."""
    p, env = cfg.parallel, "probe" if probe else None
    layout = dict(pp=p.pp, vpp=p.vpp, dtype=cfg.model.dtype)
    g = cfg.generate
    if g.engine == "megatron":  # auto never fails: it falls back to ours
        resolve_engine(g.engine, "generate.engine", env=env, temperature=g.temperature,
                       stop=(), **layout)
    if cfg.stage == "rl" and cfg.rl.engine == "megatron":
        resolve_engine(cfg.rl.engine, "rl.engine", env=env, temperature=cfg.rl.temperature,
                       stop=cfg.rl.stop, **layout)
    if probe:  # a launcher cannot know the processes' devices
        import torch
        missing = None if torch.cuda.is_available() else "a CUDA device (none is visible)"
        resolve_cuda_graphs(g.cuda_graphs, "generate.cuda_graphs", missing)
        if cfg.stage == "rl":
            resolve_cuda_graphs(cfg.rl.cuda_graphs, "rl.cuda_graphs", missing)


def validate(cfg: Config, world_size: int, *,
             have_fused_norms: Optional[bool] = False) -> ParallelDims:
    """Raise ConfigError (LayoutError for the layout) for the first broken rule; return the
    layout. have_fused_norms says whether TE or apex norms import where the run executes; None
    when this process cannot know (a launcher), which leaves the rules on what the run's machine
    has (fused norms; CUDA and flash-attn for engine=megatron) to the processes."""
    check_fields(cfg)
    if cfg.model.name == "hf" or cfg.model.hf_path:
        model_fields(cfg.model.hf_path)  # the folder, config.json and architecture are usable
    _check_model_and_train(cfg)
    if cfg.stage == "rl":
        _check_rl_stage(cfg)
    _check_data(cfg)
    _check_engines(cfg, probe=have_fused_norms is not None)
    m, t, p = cfg.model, cfg.train, cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp)
    dims.validate(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_query_groups=m.num_query_groups, seq_len=t.seq_len,
                  global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                  sequence_parallel=p.sequence_parallel, have_fused_norms=have_fused_norms)
    return dims


__all__ = ["ConfigError", "validate"]
