"""`python -m megatron_ext.convert import --hf DIR --out CKPT` and
`python -m megatron_ext.convert export --checkpoint RUN/checkpoints/step_N --out HFDIR`: one
process, on the CPU (or the one GPU it sees)."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.convert")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Hugging Face folder into our dist checkpoint")
    imp.add_argument("--hf", required=True, help="HF model folder (config.json, *.safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint folder to write (new)")
    exp = sub.add_parser("export", help="our checkpoint (any layout) into a Hugging Face folder")
    exp.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_N")
    exp.add_argument("--out", required=True, help="HF folder to write")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    args = parser.parse_args(argv)
    from megatron_ext.convert.export import export_checkpoint, import_hf
    from parallel import topology
    try:
        if args.command == "import":
            path = import_hf(args.hf, args.out)
        else:
            path = export_checkpoint(args.checkpoint, args.out, int(args.max_shard_gb * 2 ** 30))
    except (ValueError, OSError, KeyError) as err:
        print(f"convert error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        topology.destroy()
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
