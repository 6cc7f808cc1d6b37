"""`python -m launch local --nproc N -- <overrides>`: start a training run's processes."""
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
    args, rest = parser.parse_known_args(argv)
    overrides = rest + overrides
    if args.mode == "local":
        from megatron_ext.train import checked_config
        checked_config(overrides, args.nproc)  # fail before any process starts
        return run_local(args.nproc, overrides)
    return 2


if __name__ == "__main__":
    sys.exit(main())
