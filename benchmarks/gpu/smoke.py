"""One-GPU SFT then GRPO smoke (NCCL, world 1, bf16, model.fused_loss/fused_swiglu=true, NVML
every step): each run must exit 0, log finite losses, train on cuda and write real GPU samples
to run_dir/gpu_stats. GRPO starts from the SFT run's checkpoint and keeps a reference model
(rl.kl_coef > 0), so rollouts, rewards, reference log-probs and the KL all meet on the GPU.

  python -m benchmarks.gpu.smoke --run-root /tmp/smoke            # on a GPU
  python -m benchmarks.gpu.smoke --run-root /tmp/smoke --dry-run  # CPU (no NVML expected)
"""
from __future__ import annotations

import math
import os
import sys

from benchmarks.gpu.common import Table, last_line, parser, run_train

SFT_STEPS, RL_STEPS = 10, 3


def _check(table: Table, name: str, run: dict, steps: int, dry_run: bool) -> bool:
    losses = [r["loss"] for r in run["metrics"] if "split" not in r and "loss" in r]
    gpu = [r for r in run["gpu_stats"] if "gpu0/util_pct" in r]
    where = "cpu" if dry_run else "cuda"
    problems = []
    if run["code"] != 0:
        problems.append(f"exit {run['code']}: {last_line(run['output'])}")
    if len(losses) < steps or not all(math.isfinite(x) for x in losses):
        problems.append(f"{len(losses)} finite losses of {steps}")
    if f"on {where}" not in run["output"]:
        problems.append(f"no 'on {where}' layout line")
    if "uses megatron's" in run["output"]:
        problems.append("a fused op fell back to megatron's")
    if not dry_run and not gpu:
        problems.append("no NVML samples in gpu_stats/")
    stats = (f"{len(gpu)} samples, util max {max(r['gpu0/util_pct'] for r in gpu):.0f}%, "
             f"mem max {max(r['gpu0/mem_used_gib'] for r in gpu):.1f} GiB" if gpu
             else "none (no NVML on a CPU)" if dry_run else "none")
    table.add(name, len(losses), f"{losses[-1]:.3f}" if losses else "-", stats,
              "FAIL (" + "; ".join(problems) + ")" if problems else "ok")
    return not problems


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--run-root", required=True, help="folder for the two run directories")
    args = p.parse_args()
    common = ["model=tiny", "model.dtype=" + ("fp32" if args.dry_run else "bf16"),
              "model.fused_loss=true", "model.fused_swiglu=true", "logging.nvml_interval=1",
              "train.log_interval=1", "train.warmup_steps=0", "train.eval_samples=8"]
    table = Table("1-GPU smoke runs (world 1" + (", CPU dry run)" if args.dry_run else ", NCCL)"),
                  ["run", "steps logged", "last loss", "gpu_stats", "result"])
    sft_dir = os.path.join(args.run_root, "sft")
    sft = run_train(common + [f"train.steps={SFT_STEPS}", f"train.save_interval={SFT_STEPS}"],
                    sft_dir, 600, args.dry_run)
    if _check(table, "SFT", sft, SFT_STEPS, args.dry_run):
        with open(os.path.join(sft_dir, "checkpoints", "latest"), encoding="utf-8") as f:
            init = os.path.join(sft_dir, "checkpoints", f.read().strip())
        rl = run_train(common + ["stage=rl", "rl=grpo", f"rl.init_checkpoint={init}",
                                 f"train.steps={RL_STEPS}", "rl.prompts_per_step=4",
                                 "rl.group_size=4", "rl.max_new_tokens=16", "rl.band_low=0",
                                 "rl.band_high=1", "rl.kl_coef=0.01", "train.lr=1e-4",
                                 "train.min_lr=1e-4"],
                       os.path.join(args.run_root, "grpo"), 600, args.dry_run)
        _check(table, "GRPO", rl, RL_STEPS, args.dry_run)
    else:
        table.add("GRPO", "-", "-", "-", "FAIL (not run: the SFT run failed)")
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
