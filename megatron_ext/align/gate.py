"""The SFT data gate (`data.fidelity_gate`): score the SFT set against the target style before training.

The trainer calls run_fidelity_gate before its first step and trains on GateResult.train_path.
`fail` stops the run with FidelityGateError, `filter` trains on the traces that pass, `warn`
logs and goes on. Either way the full report lands in out_dir.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Optional

from megatron_ext.align.compare import compare
from megatron_ext.align.filter import write_split
from megatron_ext.config.schema import FidelityGateConfig

PREFIX = "data.fidelity_gate"


class FidelityGateError(ValueError):
    """The SFT data is too far from the target style."""


@dataclasses.dataclass(frozen=True)
class GateResult:
    action: str
    passed: bool  # False only for `warn` with problems (`fail` raises instead)
    train_path: str  # the file to train on: the candidate, or the kept traces under `filter`
    dataset_score: Optional[float]  # of the whole candidate set; None when the gate is disabled
    n_traces: int
    n_below: int  # traces under min_trace_score
    report_dir: Optional[str]
    problems: List[str]


def run_fidelity_gate(gate_cfg: FidelityGateConfig, candidate_path: str, out_dir: str,
                      log: Callable[[str], None] = print) -> GateResult:
    """Run the gate on the SFT file `candidate_path`, writing the report (and filtered files) to out_dir.
    gate_cfg has passed config.validate (its action, thresholds and reference file)."""
    if not gate_cfg.enabled:
        return GateResult(gate_cfg.action, True, candidate_path, None, 0, 0, None, [])
    from megatron_ext.align.report import write_report  # matplotlib: only when the gate runs
    result = compare(gate_cfg.reference, candidate_path)
    write_report(result, out_dir)
    score, n = result.dataset_score, len(result.traces)
    below = [t for t in result.traces if t.score < gate_cfg.min_trace_score]
    pulled = ", ".join(f"{k} ({v})" for k, v in list(result.reason_counts(gate_cfg.min_trace_score).items())[:3])
    report_md = os.path.join(out_dir, "report.md")
    log(f"fidelity gate: dataset score {score:.3f} (min {gate_cfg.min_dataset_score}), {len(below)}/{n} traces "
        f"below {gate_cfg.min_trace_score}{'; pulled down by ' + pulled if pulled else ''}; report {report_md}")
    problems = []
    if score < gate_cfg.min_dataset_score:
        problems.append(f"dataset score {score:.3f} is below {PREFIX}.min_dataset_score={gate_cfg.min_dataset_score}")
    if below:
        problems.append(f"{len(below)} of {n} traces score below {PREFIX}.min_trace_score={gate_cfg.min_trace_score} "
                        f"(worst {min(t.score for t in below):.3f})")
    restyle = f"fix: make {candidate_path} follow the style of {gate_cfg.reference} (see {report_md})"
    fix = f"{restyle}, set {PREFIX}.action=filter to train only on the traces that pass, or lower the thresholds"

    if gate_cfg.action == "filter":
        kept = os.path.join(out_dir, "kept.jsonl")
        stats = write_split(candidate_path, result.traces, gate_cfg.min_trace_score, kept,
                            os.path.join(out_dir, "rejected.jsonl"))
        kept_scores = [t.score for t in result.traces if t.score >= gate_cfg.min_trace_score]
        if not kept_scores:
            raise FidelityGateError(f"fidelity gate: none of the {n} traces scores at least {PREFIX}.min_trace_score="
                                    f"{gate_cfg.min_trace_score}, nothing is left to train on; {restyle}, or lower "
                                    "the threshold")
        kept_score = sum(kept_scores) / len(kept_scores)
        if kept_score < gate_cfg.min_dataset_score:
            raise FidelityGateError(f"fidelity gate: after filtering, the {stats.kept} traces left score "
                                    f"{kept_score:.3f}, below {PREFIX}.min_dataset_score={gate_cfg.min_dataset_score}; "
                                    f"{restyle}, or lower the thresholds")
        log(f"fidelity gate: filter kept {stats.kept}/{n} traces (dataset score {kept_score:.3f}) -> {kept}; "
            f"rejected {stats.rejected} -> {stats.rejected_path}")
        return GateResult("filter", True, kept, score, n, len(below), out_dir, problems)
    if problems and gate_cfg.action == "fail":
        raise FidelityGateError("fidelity gate failed: " + "; ".join(problems) + "; " + fix)
    for p in problems:
        log(f"fidelity gate WARNING: {p}; {fix}")
    return GateResult(gate_cfg.action, not problems, candidate_path, score, n, len(below), out_dir, problems)
