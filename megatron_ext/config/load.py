"""Compose the Hydra config without Hydra's run-directory side effects, once per process, and
validate it before any process exists; name the run directory; and the exit code by which a
run asks its launcher for a requeue. The launcher and the trainer both start here."""
from __future__ import annotations

import datetime
import os
import pathlib
import sys
from typing import Optional, Sequence, Tuple

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf

from megatron_ext.config.hf import (fields_of, hf_origin, model_fields, recorded_tokenizer,
                                    start_checkpoint)
from megatron_ext.config.layout import ParallelDims
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
ConfigStore.instance().store(name="base_config", node=Config)

# "Requeue me": the trainer saved a checkpoint because it was told to stop, and the run should
# go on in a new allocation. 75 is EX_TEMPFAIL (sysexits.h), a code no crash produces.
REQUEUE_EXIT_CODE = 75


def compose_config(overrides: Sequence[str] = ()) -> Config:
    """The resolved, typed config for these Hydra overrides (e.g. `parallel.tp=2`). A typo
    in a key or a bad value raises Hydra's error naming it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        node = compose(config_name="config", overrides=list(overrides))
    return from_hf(OmegaConf.to_object(node))


def from_hf(cfg: Config) -> Config:
    """model=hf: the shape, RoPE, norm and attention fields from model.hf_path's config.json
    (which wins over the yaml), and its tokenizer unless data.tokenizer names another."""
    if cfg.model.name != "hf" and not cfg.model.hf_path:
        return from_checkpoint_origin(cfg)
    for key, value in model_fields(cfg.model.hf_path).items():
        setattr(cfg.model, key, value)
    if cfg.data.tokenizer == "byte":
        cfg.data.tokenizer = cfg.model.hf_path
    return cfg


def from_checkpoint_origin(cfg: Config) -> Config:
    """No model=hf, but the run starts from a checkpoint of an HF model (train.resume=PATH, or
    stage=rl's rl.init_checkpoint, e.g. one `convert import` wrote): the fields model=hf would
    set, from the config.json the checkpoint's origin records (no other shape loads it), and
    its recorded tokenizer unless data.tokenizer names another."""
    path = start_checkpoint(cfg)
    origin = hf_origin(path) if path else None
    if origin is None:
        return cfg
    where = f"checkpoint {path}"
    for key, value in fields_of(origin["hf_config"], f"the HF config.json {where} records").items():
        setattr(cfg.model, key, value)
    cfg.model.source = f"the HF origin {where} records"
    if cfg.data.tokenizer == "byte":
        cfg.data.tokenizer = recorded_tokenizer(origin, where)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def checked_config(overrides: Sequence[str], world_size: int, *,
                   have_fused_norms: Optional[bool] = False) -> Tuple[Config, ParallelDims]:
    """Compose and validate (see validate() for have_fused_norms), or exit with code 2 and one
    line naming the problem: nothing has started yet, so nothing is lost."""
    try:
        cfg = compose_config(overrides)
        dims = validate(cfg, world_size, have_fused_norms=have_fused_norms)
    except (HydraException, ValueError) as err:
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        print(f"config error: {err}{cause}".replace("\n", " "), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return cfg, dims


def run_directory(cfg: Config) -> str:
    """The run directory, absolute: run.dir, else outputs/<run.name>-<time> under the working
    directory. A time-stamped name is chosen once (by the launcher or rank 0) and passed on."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(cfg.run.dir or os.path.join("outputs", f"{cfg.run.name}-{stamp}"))
