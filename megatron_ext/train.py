"""`python -m megatron_ext.train [hydra overrides]`: pretraining, SFT and RL chosen by the config.

Started once per process by `python -m launch local|slurm`, torchrun or srun. The config is
composed and validated before any process group exists; the run directory is printed first."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_ext import compat
from megatron_ext.config.load import checked_config, run_directory, to_yaml
from megatron_ext.config.schema import Config
from parallel import topology


def resolve_run_dir(cfg: Config, topo: topology.Topology) -> str:
    """run.dir, or a time-stamped one (config.load.run_directory) chosen by rank 0 and shared
    with every rank."""
    if cfg.run.dir is not None:
        return run_directory(cfg)
    chosen = [run_directory(cfg) if topo.is_logging_rank else None]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0, group=dist.group.WORLD)
    return chosen[0]


def apply_fidelity_gate(cfg: Config, topo: topology.Topology, run_dir: str):
    """Run `data.fidelity_gate` on rank 0 before any training step; every rank then trains on
    the file it chose (the kept traces under action=filter) or exits 2 with its message."""
    if not cfg.data.fidelity_gate.enabled:
        return cfg, None
    from megatron_ext.align.gate import run_fidelity_gate
    outcome = [None]
    if topo.is_logging_rank:
        try:
            r = run_fidelity_gate(cfg.data.fidelity_gate, cfg.data.path,
                                  os.path.join(run_dir, "fidelity"))
            outcome[0] = {"path": r.train_path, "score": r.dataset_score,
                          "below": r.n_below, "traces": r.n_traces}
        except ValueError as err:  # FidelityGateError and bad data lines
            outcome[0] = {"error": str(err)}
    dist.broadcast_object_list(outcome, src=0, group=dist.group.WORLD)
    result = outcome[0]
    if "error" in result:
        if topo.is_logging_rank:
            print(f"fidelity gate: {result['error']}", file=sys.stderr, flush=True)
        topology.destroy()
        raise SystemExit(2)
    data = dataclasses.replace(cfg.data, path=result["path"])
    record = {"step": 0, "split": "fidelity", "dataset_score": result["score"],
              "traces_below_min": result["below"], "traces": result["traces"]}
    return dataclasses.replace(cfg, data=data), record


def build_loop(cfg: Config, topo: topology.Topology, run_dir: str):
    """The training loop around the recipe `stage` names (imported after the CPU bridge)."""
    from megatron_ext.training.loop import TrainLoop
    if cfg.stage == "rl":
        from megatron_ext.rl.recipe import RLRecipe as Recipe
    else:
        from megatron_ext.sft.recipe import SFTRecipe as Recipe

    def log(message: str) -> None:
        if topo.is_logging_rank:
            print(message, flush=True)

    return TrainLoop(cfg, topo, run_dir, Recipe(cfg, topo, log))


def refuse_unserved_fused_ops(cfg: Config) -> None:
    """model.fused_*=true where this machine cannot serve our kernels (a GPU without the CUDA
    build) is a config error before any process group exists, like the other config mistakes."""
    import torch

    from megatron_ext.ops import FusedConfigError, resolve_fused
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        for key in ("fused_loss", "fused_swiglu"):
            resolve_fused(key, getattr(cfg.model, key), device)
    except FusedConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    overrides = list(sys.argv[1:] if argv is None else argv)
    fused_norms = compat.has_transformer_engine() or compat.has_apex()
    cfg, dims = checked_config(overrides, topology.env_world()[2], have_fused_norms=fused_norms)
    refuse_unserved_fused_ops(cfg)
    compat.setup(verbose=cfg.logging.verbose)
    topo = topology.initialize(dims, seed=cfg.seed, timeout_s=cfg.parallel.timeout_s)
    run_dir = resolve_run_dir(cfg, topo)
    where = topology.placement(topo)  # a collective: every rank
    if topo.is_logging_rank:
        print(f"run directory: {run_dir}", flush=True)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        print(f"layout: world {dims.world_size} = tp {dims.tp} x pp {dims.pp} x cp {dims.cp} x "
              f"dp {dims.dp}{f' (vpp {dims.vpp})' if dims.vpp else ''} on "
              f"{topo.device.type}", flush=True)
        print(where, flush=True)
        print(compat.fallback_line(watch_gpus=cfg.logging.nvml_interval > 0), flush=True)
    try:
        cfg, gate = apply_fidelity_gate(cfg, topo, run_dir)
        loop = build_loop(cfg, topo, run_dir)
        if gate is not None:
            loop.logger.log(gate)
        return loop.run()
    finally:
        topology.destroy()


if __name__ == "__main__":
    main()
