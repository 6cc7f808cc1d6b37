"""`python -m megatron_ext.plot RUN_DIR`: draw a run's curves from RUN_DIR/metrics.jsonl into
PNGs under RUN_DIR/plots/ (every run also writes them when it ends). Exit 2 when there is
nothing to draw."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_ext.logging.plots import PlotError, write_plots


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.plot",
                                     description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory")
    args = parser.parse_args(argv)
    try:
        paths = write_plots(args.run_dir)
    except PlotError as err:
        print(f"plot: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
