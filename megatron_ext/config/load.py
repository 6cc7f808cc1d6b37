"""Compose the Hydra config without Hydra's run-directory side effects, once per process, and
validate it before any process group exists."""
from __future__ import annotations

import pathlib
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from megatron_ext.config.schema import Config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
ConfigStore.instance().store(name="base_config", node=Config)


def compose_config(overrides: Sequence[str] = ()) -> Config:
    """The resolved, typed config for these Hydra overrides (e.g. `parallel.tp=2`). A typo
    in a key or a bad value raises Hydra's error naming it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        node = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(node)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
