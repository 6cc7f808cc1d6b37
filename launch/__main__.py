"""`python -m launch local --nproc N -- <overrides>`: start a training run's processes here.
`python -m launch slurm [--dry-run] [--python PY] <overrides>`: submit them as a SLURM job."""
from __future__ import annotations

import argparse
import sys

from launch.local import run_local


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m launch")
    sub = parser.add_subparsers(dest="mode", required=True)
    local = sub.add_parser("local", help="N processes on this machine (torchrun semantics)")
    local.add_argument("--nproc", type=int, required=True, help="processes to start")
    local.add_argument("--entry", choices=("train", "generate"), default="train",
                       help="python -m megatron_ext.<entry> in each process")
    slurm = sub.add_parser("slurm", help="sbatch a job that srun's one task per GPU (or per "
                           "cluster.tasks_per_node) on cluster.nodes nodes",
                           description="Hydra overrides follow the options, e.g. "
                           "cluster.nodes=2 cluster.gpus_per_node=8 cluster.partition=gpu")
    slurm.add_argument("--dry-run", action="store_true",
                       help="print the sbatch script; write and submit nothing")
    slurm.add_argument("--python", default="",
                       help="the interpreter the tasks run (default: this one, or `python` "
                            "inside cluster.container_image)")
    args, rest = parser.parse_known_args(argv)
    overrides = rest + overrides
    if args.mode == "local":
        from megatron_ext.config.load import checked_config
        # fail before any process starts; whether TE/apex norms import is for the ranks to say
        checked_config(overrides, args.nproc, have_fused_norms=None)
        entry = [sys.executable, "-m", f"megatron_ext.{args.entry}"]
        return run_local(args.nproc, overrides, entry=entry)
    if args.mode == "slurm":
        from launch.slurm import run_slurm
        return run_slurm(overrides, dry_run=args.dry_run, python=args.python)
    return 2


if __name__ == "__main__":
    sys.exit(main())
