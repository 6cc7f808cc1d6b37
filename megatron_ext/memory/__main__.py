"""python -m megatron_ext.memory <hydra overrides> [--gpu-mem 80GiB] [--world-size N] [--json]

Composes the same Hydra config that trains and prints the predicted bytes per rank type."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megatron_ext.config.load import compose_config
from megatron_ext.memory.device import parse_size, visible_gpu_memory
from megatron_ext.memory.planner import plan
from megatron_ext.memory.report import render, to_json


def _reserve(text: str, capacity: Optional[int]) -> int:
    if capacity is None:
        return 0
    if text.endswith("%"):
        return int(capacity * float(text[:-1]) / 100)
    return parse_size(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.memory",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=small")
    parser.add_argument("--gpu-mem", help="device memory, e.g. 80GiB (default: the visible "
                        "GPU through NVML; none on CPU)")
    parser.add_argument("--reserve", default="10%", help="memory kept free for the CUDA "
                        "context, NCCL buffers and fragmentation: bytes (4GiB) or a share of "
                        "the device (10%%, the default)")
    parser.add_argument("--world-size", type=int, help="processes (default tp*pp*cp: DP 1)")
    parser.add_argument("--attention", choices=("auto", "local", "flash", "ring"),
                        default="auto", help="core attention (auto: ring when cp > 1, else "
                        "flash with the TE spec, else local)")
    parser.add_argument("--spec", choices=("auto", "local", "te"), default="auto",
                        help="layer spec (auto: TE when it imports here, as the builder does)")
    parser.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="plan the fused linear cross-entropy (default: as wired today)")
    parser.add_argument("--fused-swiglu", action=argparse.BooleanOptionalAction, default=None,
                        help="plan our fused swiglu (default: as wired today)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)

    try:
        cfg = compose_config(args.overrides)
        capacity = parse_size(args.gpu_mem) if args.gpu_mem else visible_gpu_memory()
        result = plan(cfg, args.world_size, attention=args.attention, spec=args.spec,
                      fused_loss=args.fused_loss, fused_swiglu=args.fused_swiglu)
        reserve = _reserve(args.reserve, capacity)
    except ValueError as err:  # PlanError, LayoutError, a bad size: the message says the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(result, capacity, reserve), indent=2))
    else:
        print(render(result, capacity, reserve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
