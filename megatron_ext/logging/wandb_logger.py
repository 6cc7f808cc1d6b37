"""Weights & Biases on the logging rank: offline by default, files inside the run directory."""
from __future__ import annotations

import os
from typing import Dict, Optional

from megatron_ext.config.schema import Config


class WandbLogger:
    """One W&B run per training run. The run id is stored in run_dir/wandb_run_id so a resumed
    or requeued job continues the same W&B run."""

    def __init__(self, cfg: Config, run_dir: str, config_dict: Dict):
        os.environ.setdefault("WANDB_MODE", cfg.logging.mode)
        wandb_dir = os.path.join(run_dir, "wandb")
        os.makedirs(wandb_dir, exist_ok=True)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            os.environ.setdefault(var, os.path.join(wandb_dir, sub))
        import wandb
        id_file = os.path.join(run_dir, "wandb_run_id")
        run_id: Optional[str] = open(id_file).read().strip() if os.path.exists(id_file) else None
        self.run = wandb.init(
            project=cfg.logging.project, entity=cfg.logging.entity, group=cfg.logging.group,
            tags=list(cfg.logging.tags) or None, name=cfg.run.name, config=config_dict,
            dir=wandb_dir, id=run_id, resume="allow", settings=wandb.Settings(console="off"),
        )
        with open(id_file, "w") as f:
            f.write(self.run.id)

    def log(self, record: Dict) -> None:
        prefix = record.get("split", "train") + "/"
        data = {prefix + k: v for k, v in record.items()
                if k not in ("step", "split") and isinstance(v, (int, float))}
        self.run.log(data, step=int(record["step"]))

    def finish(self) -> None:
        self.run.finish()


class NullLogger:
    def log(self, record: Dict) -> None:
        pass

    def finish(self) -> None:
        pass


def build_logger(cfg: Config, run_dir: str, enabled: bool):
    if not enabled or cfg.logging.backend == "none":
        return NullLogger()
    from omegaconf import OmegaConf
    return WandbLogger(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
