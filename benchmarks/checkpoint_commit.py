"""Checkpoint commit time (save call to committed) of the `1b`-shaped model, fp32 with Adam
state, on CPU: 1 rank vs 4 ranks (TP2 x PP2), before and after the integrity change.

  python -m benchmarks.checkpoint_commit                 # 1 and 4 ranks, 2 repeats each
  python -m benchmarks.checkpoint_commit --layers 4 --repeats 3

before: what training/checkpoint.py did up to commit 7aa3acf: dist_checkpointing's default
  writer, then rank 0 alone fsyncs and sha256-hashes every file of the checkpoint between two
  barriers (the other ranks wait) and writes the manifest.
after: CheckpointManager.save: megatron's fully parallel writer (replicated tensors spread over
  DP), every rank fsyncs and hashes the files it wrote, rank 0 gathers the entries and writes
  the manifest.
"write" is the save call up to the hashing (for after: everything but the integrity commit, the
rename and `latest` included), "integrity" the fsync + hash + manifest.
The two alternate on the same model in one launch per world size, so the machine's load hits
both alike; each row gives the median of the repeats, split into the write (dist_checkpointing
to the returned save) and the integrity commit. The model is the 1b preset's shape (hidden 2048,
FFN 8192, 32 heads / 8 KV groups, vocab 128256, tied embeddings) with `--layers` of its 16
layers, so that model, gradients and Adam state fit a shared 24 GiB machine."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from tests.dist._spawn import run_distributed

LAYOUTS = {1: [], 2: [], 4: ["parallel.tp=2", "parallel.pp=2"]}  # 2: DP2 (--worlds 2)


def _commit_before(sharded, tmp, rank):
    """The previous commit: default writer, then rank 0 hashes every file alone."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_ext.compat.ckpt_writer import route_write_results
    from megatron_ext.training.checkpoint import integrity
    from megatron_ext.training.checkpoint.rng import rng_state

    route_write_results(background=False)
    start = time.perf_counter()
    dist_checkpointing.save(sharded, tmp)
    os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rank_state", f"{rank:05d}.pt"))
    written = time.perf_counter()
    dist.barrier()
    if rank == 0:
        integrity.write_manifest(tmp)  # fsync + sha256 of every file, in this process
        integrity.fsync_dirs(tmp)
    dist.barrier()
    return written - start, time.perf_counter() - written


def _worker(rank, world_size, out, layers, repeats):
    import torch
    import torch.distributed as dist

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron.core import parallel_state as ps

    from megatron_ext.models.gpt import build_model
    from megatron_ext.training.checkpoint import (CheckpointManager, ModelPart, OptimizerPart,
                                                  integrity, model_shape)
    from megatron_ext.training.optimizer import build_optimizer

    cfg = compose_config(["logging=none", "model=1b", "model.dtype=fp32",
                          f"model.num_layers={layers}", "train.seq_len=16",
                          "train.micro_batch_size=1", "train.global_batch_size=4",
                          *LAYOUTS[world_size]])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    model = build_model(cfg, topo, cfg.model.vocab_size)
    optimizer = build_optimizer(cfg, model)
    for chunk in model:  # one Adam step on small gradients: real exp_avg / exp_avg_sq
        for p in chunk.parameters():
            p.main_grad.normal_(0, 1e-3)
    optimizer.step()
    part = ModelPart(model)
    sharded = {"model": part, "optimizer": OptimizerPart(optimizer, part)}
    root = os.path.join(out, f"w{world_size}")
    manager = CheckpointManager(root, topo, keep=1, sharded=sharded, states={}, log=lambda m: None,
                                shape=model_shape(cfg.model, cfg.model.vocab_size, model))
    timed = {}
    commit_manifest = integrity.commit_manifest

    def timed_commit(path):  # the integrity part of the manager's commit, as it runs
        start = time.perf_counter()
        commit_manifest(path)
        timed["commit_s"] = time.perf_counter() - start

    integrity.commit_manifest = timed_commit
    rows = {"before": [], "after": []}
    for rep in range(repeats):
        for mode in ("before", "after"):
            if rank == 0:
                shutil.rmtree(root, ignore_errors=True)
                os.makedirs(os.path.join(root, "before"))
            dist.barrier()
            if mode == "before":
                state = {n: p.sharded_state_dict(is_loading=False) for n, p in sharded.items()}
                write_s, commit_s = _commit_before(state, os.path.join(root, "before"), rank)
                path = os.path.join(root, "before")
            else:
                start = time.perf_counter()
                path = manager.save(rep + 1)
                total_s = time.perf_counter() - start
                commit_s = timed["commit_s"]
                write_s = total_s - commit_s
            size = sum(e["size"] for e in integrity.read_manifest(path)[0].values())
            rows[mode].append({"write_s": write_s, "commit_s": commit_s,
                               "total_s": write_s + commit_s, "bytes": size})
    if rank == 0:
        with open(os.path.join(out, f"w{world_size}.json"), "w") as f:
            json.dump({"rows": rows, "params": sum(p.numel() for c in model
                                                   for p in c.parameters())}, f)
    ps.destroy_model_parallel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="of the 1b preset's 16 (memory)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="ckpt_commit_")
    try:
        print("| ranks | layout | commit | write s | integrity s | save to committed s | "
              "checkpoint GB |\n|---|---|---|---|---|---|---|")
        for world in args.worlds:
            run_distributed(_worker, world, out, args.layers, args.repeats, timeout_s=3600)
            got = json.load(open(os.path.join(out, f"w{world}.json")))
            for mode, rows in got["rows"].items():
                med = lambda k: statistics.median(r[k] for r in rows)
                layout = " x ".join(o.split(".")[1] for o in LAYOUTS[world]) or f"dp={world}"
                print(f"| {world} | {layout} | {mode} | "
                      f"{med('write_s'):.1f} | {med('commit_s'):.1f} | {med('total_s'):.1f} | "
                      f"{rows[0]['bytes'] / 1e9:.2f} |", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
