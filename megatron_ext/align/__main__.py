"""`python -m megatron_ext.align {profile,compare,filter,make-traces} ...`.

There is no --target-checkpoint yet: the log-likelihood criterion is available through
compare(loglik_fn=...) and gets its flag once the trainer's model code can load a checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

from megatron_ext.align.compare import compare
from megatron_ext.align.filter import check_score_threshold, write_split
from megatron_ext.align.jsonl import open_for_writing, to_line
from megatron_ext.align.profile import DEFAULT_ANSWER_PATTERN, STEP_MODES, ProfileConfig, Summary, profile_file
from megatron_ext.align.synth import write_traces
from megatron_ext.data.task import STYLES


def _add_profile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", choices=STEP_MODES, default="lines", help="what separates reasoning steps")
    p.add_argument("--answer-pattern", default=DEFAULT_ANSWER_PATTERN,
                   help="regex the whole last line must match; group 1 is the answer")
    p.add_argument("--skip-malformed", action="store_true",
                   help="report malformed lines (file:line) and go on instead of stopping at the first")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_ext.align", description=(
        "Reasoning-trace format fidelity: profile traces, score them against a reference set in the "
        "target style, filter a set by score, write built-in task traces."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="features of each trace and their distribution")
    p.add_argument("--input", required=True, help="JSONL with prompt, response and optional answer")
    p.add_argument("--out", required=True, help="folder for profile.json (summary) and profile_traces.jsonl")
    _add_profile_options(p)

    p = sub.add_parser("compare", help="score a candidate set against a reference set in the target style")
    p.add_argument("--reference", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--out", required=True, help="folder for report.json, report.md and hist_*.png")
    _add_profile_options(p)

    p = sub.add_parser("filter", help="split a candidate set into kept and rejected traces by score")
    p.add_argument("--reference", required=True)
    p.add_argument("--candidate", required=True)
    p.add_argument("--min-score", type=float, required=True, help="keep traces scoring at least this (0..1)")
    p.add_argument("--out-kept", required=True)
    p.add_argument("--out-rejected", required=True)
    _add_profile_options(p)

    p = sub.add_parser("make-traces", help="write built-in task traces in one style")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--style", choices=STYLES, default="target")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-ops", type=int, default=1)
    p.add_argument("--max-ops", type=int, default=2)
    p.add_argument("--split", choices=("train", "heldout"), default="train")
    return parser


def _config(args: argparse.Namespace) -> ProfileConfig:
    return ProfileConfig(args.steps, args.answer_pattern)


def _report_skipped(malformed: List[str]) -> None:
    for m in malformed:
        print(f"skipped malformed line {m}", file=sys.stderr)


def _make_traces(args: argparse.Namespace) -> None:
    n = write_traces(args.out, args.n, args.style, seed=args.seed, min_ops=args.min_ops, max_ops=args.max_ops,
                     split=args.split)
    print(f"wrote {n} {args.style} traces to {args.out}")


def _profile(args: argparse.Namespace) -> None:
    config, malformed, summary = _config(args), [], Summary()
    with open_for_writing(os.path.join(args.out, "profile_traces.jsonl")) as f:
        for trace, p in profile_file(args.input, config, malformed if args.skip_malformed else None):
            f.write(to_line({"line": trace.line, **p.to_json()}))
            summary.add(p)
    report = {"path": args.input, "profile_config": dataclasses.asdict(config), **summary.to_json(),
              "malformed": malformed}
    with open(os.path.join(args.out, "profile.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    _report_skipped(malformed)
    print(f"profiled {report['n_traces']} traces; wrote {args.out}/profile.json and {args.out}/profile_traces.jsonl")


def _compare(args: argparse.Namespace) -> None:
    from megatron_ext.align.report import write_report  # loads matplotlib: only the command that plots pays for it

    result = compare(args.reference, args.candidate, config=_config(args), skip_malformed=args.skip_malformed)
    _report_skipped(result.malformed["reference"] + result.malformed["candidate"])
    write_report(result, args.out)
    print(f"dataset score {result.dataset_score:.3f} over {len(result.traces)} traces; "
          f"report in {os.path.join(args.out, 'report.md')}")


def _filter(args: argparse.Namespace) -> None:
    check_score_threshold("--min-score", args.min_score)
    result = compare(args.reference, args.candidate, config=_config(args), skip_malformed=args.skip_malformed)
    _report_skipped(result.malformed["reference"] + result.malformed["candidate"])
    stats = write_split(args.candidate, result.traces, args.min_score, args.out_kept, args.out_rejected,
                        args.skip_malformed)
    print(f"kept {stats.kept} traces (score >= {args.min_score}) -> {stats.kept_path}; "
          f"rejected {stats.rejected} -> {stats.rejected_path}; dataset score {result.dataset_score:.3f}")


COMMANDS = {"profile": _profile, "compare": _compare, "filter": _filter, "make-traces": _make_traces}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (OSError, ValueError) as e:  # bad input or paths: the message names the file, line and fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
