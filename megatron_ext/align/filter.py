"""Split a candidate trace file by fidelity score into a kept file (training data) and a rejected one."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from megatron_ext.align.jsonl import open_for_writing, read_traces, to_line
from megatron_ext.align.score import TraceScore


@dataclasses.dataclass(frozen=True)
class FilterStats:
    kept: int
    rejected: int
    kept_path: str
    rejected_path: str


def check_score_threshold(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]; fidelity scores lie in [0, 1]")


def write_split(candidate: str, scores: Sequence[TraceScore], min_score: float, kept_path: str,
                rejected_path: str, skip_malformed: bool = False) -> FilterStats:
    """Stream the candidate again: traces scoring >= min_score go unchanged to kept_path, the rest to
    rejected_path with a `fidelity` field {"score", "reasons"}. `scores` come from compare() on the
    same file with the same skip_malformed, so both passes see the same traces in the same order."""
    check_score_threshold("min_score", min_score)
    kept = rejected = 0
    with open_for_writing(kept_path) as kf, open_for_writing(rejected_path) as rf:
        for trace, s in itertools.zip_longest(read_traces(candidate, [] if skip_malformed else None), scores):
            if trace is None or s is None or trace.line != s.line:
                raise ValueError(f"{candidate} changed since it was scored (trace at line "
                                 f"{getattr(trace, 'line', None)} vs score for line {getattr(s, 'line', None)}); "
                                 "score it again")
            if s.score >= min_score:
                kf.write(to_line(trace.record))
                kept += 1
            else:
                rf.write(to_line({**trace.record, "fidelity": {"score": s.score, "reasons": s.reasons}}))
                rejected += 1
    return FilterStats(kept, rejected, kept_path, rejected_path)
