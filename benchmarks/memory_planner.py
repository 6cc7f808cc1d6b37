"""The memory planner against measured CPU training steps, over a grid of layouts.

  python -m benchmarks.memory_planner            # the whole grid (minutes on 2 cores)
  python -m benchmarks.memory_planner --only 1   # the single-process rows only

Each layout trains one step of a real Trainer on gloo; its forward+backward is measured as the
peak of live CPU tensor bytes (megatron_ext.memory.measure) and its parameters, grad buffers
and optimizer state are counted after the step. Prints a markdown table: predicted and
measured activation peak per pipeline-rank type, their ratio, and whether the static bytes
matched exactly. Layouts of one world size share one launch.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time

from megatron_ext.memory.compare import compare
from megatron_ext.memory.measure import measure_layouts
from tests.dist._spawn import run_distributed

BASE = ["logging=none", "model.fused_loss=false", "model.fused_swiglu=false", "model=tiny",
        "data.num_samples=2000", "train.steps=1",
        "train.warmup_steps=0"]
# Wider than tiny: 8 heads of 32 with 2 KV groups (GQA) or 8 (MHA), ffn 512.
WIDE = ["model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=2",
        "model.ffn_hidden_size=512"]
MHA = WIDE[:2] + ["model.num_query_groups=8", WIDE[3]]


def layout(s: int, b: int, gbs: int = 0, *extra: str) -> list:
    return BASE + [f"train.seq_len={s}", f"train.micro_batch_size={b}",
                   f"train.global_batch_size={gbs or b}", *extra]


FULL = ["train.recompute=full"]
GRID = {
    1: {
        "tiny s64 b2": layout(64, 2),
        "tiny s256 b2": layout(256, 2),
        "tiny s256 b2 selective": layout(256, 2, 0, "train.recompute=selective"),
        "tiny s256 b2 full uniform/1": layout(256, 2, 0, *FULL),
        "tiny s256 b2 full block/2": layout(256, 2, 0, *FULL, "train.recompute_method=block",
                                            "train.recompute_num_layers=2"),
        "tiny s512 b1": layout(512, 1),
        "wide-gqa s256 b2": layout(256, 2, 0, *WIDE),
        "wide-mha s256 b2 selective": layout(256, 2, 0, *MHA, "train.recompute=selective"),
        "wide-gqa s256 b2 full uniform/2": layout(256, 2, 0, *WIDE, *FULL,
                                                  "train.recompute_num_layers=2"),
        "small (125M) s256 b1": layout(256, 1, 0, "model=small"),
    },
    2: {
        "tiny tp2 s256 b2": layout(256, 2, 0, "parallel.tp=2"),
        "tiny dp2 s256 b2 dist-opt": layout(256, 2, 4, "parallel.use_distributed_optimizer=true"),
        "tiny pp2 s256 b2 M4": layout(256, 2, 8, "parallel.pp=2"),
        "tiny pp2 s256 b2 M4 full": layout(256, 2, 8, "parallel.pp=2", *FULL),
        "wide-gqa tp2 s256 b2 selective": layout(256, 2, 0, *WIDE, "parallel.tp=2",
                                                 "train.recompute=selective"),
    },
    4: {
        "tiny tp2 pp2 s256 b2 M4 selective": layout(256, 2, 8, "parallel.tp=2", "parallel.pp=2",
                                                    "train.recompute=selective"),
        "tiny pp4 s128 b2 M4": layout(128, 2, 8, "parallel.pp=4"),
        "tiny pp2 vpp2 s128 b2 M4 dp2": layout(128, 2, 16, "parallel.pp=2", "parallel.vpp=2"),
        "wide-gqa tp2 dp2 s256 b2 dist-opt": layout(256, 2, 4, *WIDE, "parallel.tp=2",
                                                    "parallel.use_distributed_optimizer=true"),
    },
}


def run(world_size: int, layouts: dict) -> list:
    out = tempfile.mkdtemp(prefix="memory_planner_")
    try:
        names = {f"l{i}": name for i, name in enumerate(layouts)}
        run_distributed(measure_layouts, world_size, out,
                        {key: layouts[name] for key, name in names.items()}, timeout_s=1800)
        rows = []
        for key, name in names.items():
            records = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{key}.rank*.json"))]
            for row in compare(layouts[name], world_size, records):
                rows.append({"layout": name, "world": world_size, **row})
        return rows
    finally:
        shutil.rmtree(out, ignore_errors=True)


def table(rows: list) -> str:
    lines = ["| layout | world | rank | in flight | predicted MiB | measured MiB | ratio | "
             "static exact | predicted peak at |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['world']} | {r['kind']} | {r['in_flight']} | "
                     f"{r['predicted'] / 2**20:.2f} | {r['measured'] / 2**20:.2f} | "
                     f"{r['ratio']:.3f} | {'yes' if r['static_exact'] else 'NO'} | "
                     f"{r['peak_at']} |")
    within = [abs(r["ratio"] - 1) for r in rows]
    lines += ["", f"{len(rows)} rank types: {sum(w <= 0.10 for w in within)} within 10%, "
                  f"{sum(w <= 0.15 for w in within)} within 15%, worst "
                  f"{max(within):.1%}; static bytes exact in "
                  f"{sum(r['static_exact'] for r in rows)} of {len(rows)}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, choices=sorted(GRID), help="one world size")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    rows, start = [], time.time()
    for world_size, layouts in GRID.items():
        if args.only in (None, world_size):
            rows += run(world_size, layouts)
    print(table(rows))
    print(f"\n(wall {time.time() - start:.0f} s)")
    for r in rows:
        for line in r["static_mismatch"]:
            print("static mismatch:", r["layout"], line)


if __name__ == "__main__":
    main()
