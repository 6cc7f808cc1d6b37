"""Activation recomputation: activation memory and step time per policy, as ratios to `none`,
measured in one process, one run (not a test).

    .venv/bin/python benchmarks/recompute.py [--seq 512] [--layers 4] [--hidden 256] [--steps 6]

Activation memory is the peak of live tensor bytes during forward+backward above what was live
before (torch's profiler allocator totals, megatron_ext.memory.measure.peak_live_bytes),
divided by the layer count; time is the mean step time after the first step.
"""
from __future__ import annotations

import argparse
import os
import time

from megatron_ext import compat
from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import validate
from megatron_ext.memory.measure import peak_live_bytes
from parallel import topology

POLICIES = {
    "none": [],
    "selective": ["train.recompute=selective"],
    "full (uniform, 1 layer)": ["train.recompute=full", "train.recompute_method=uniform",
                                "train.recompute_num_layers=1"],
    "full (block, all 4 layers)": ["train.recompute=full", "train.recompute_method=block",
                                   "train.recompute_num_layers=4"],
}


def measure(overrides, layers, steps, run_dir):
    from megatron_ext.train import build_loop
    cfg = compose_config(overrides + [f"run.dir={run_dir}"])
    topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
    recipe = build_loop(cfg, topo, run_dir).recipe
    policy, got = recipe.policy, {}
    schedule = policy._run  # forward and backward of one global batch: the activation peak

    def measured(*args, **kwargs):
        result, got["peak"], _ = peak_live_bytes(lambda: schedule(*args, **kwargs))
        return result

    policy._run = measured
    recipe.train_step(1)
    policy._run, peak = schedule, got["peak"]
    times = []
    for step in range(2, steps + 2):
        start = time.perf_counter()
        recipe.train_step(step)
        times.append(time.perf_counter() - start)
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    return peak / layers, sum(times[1:]) / (len(times) - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--run-dir", default="/tmp/mext-recompute")
    args = ap.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    compat.setup()
    base = ["logging=none", f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            "model.num_attention_heads=8", "model.num_query_groups=4",
            f"model.ffn_hidden_size={args.hidden * 3}", f"train.seq_len={args.seq}",
            "train.micro_batch_size=4", "train.global_batch_size=4", "data.num_samples=3000",
            f"train.steps={args.steps}"]
    measure(base, args.layers, 2, args.run_dir)  # warm-up: first-run costs distort `none`
    rows = {name: measure(base + extra, args.layers, args.steps, args.run_dir)
            for name, extra in POLICIES.items()}
    mem0, t0 = rows["none"]
    print(f"model: {args.layers} layers, hidden {args.hidden}, 8 heads / 4 KV, ffn "
          f"{args.hidden * 3}; seq {args.seq}, micro-batch 4; fused loss and SwiGLU on")
    print("| policy | activation MiB per layer | memory / none | step s | time / none |")
    print("|---|---:|---:|---:|---:|")
    for name, (mem, t) in rows.items():
        print(f"| {name} | {mem / 2**20:.2f} | {mem / mem0:.2f} | {t:.3f} | {t / t0:.2f} |")


if __name__ == "__main__":
    main()
