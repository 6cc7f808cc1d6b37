"""Compare a candidate trace set with a reference set in the target style.

The reference is loaded whole (it defines the ranges); the candidate streams through and each
trace is scored as it is read. An optional `loglik_fn(prompts, responses) -> list[float]` adds
the length-normalised log-likelihood of each trace under a target checkpoint (the GRAPE
criterion: traces the target model finds unlikely are off-style for it). It is called in
batches of `batch_size` on both sets, so a model forward fits in memory.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_ext.align.divergence import js_divergence, ks_statistic, mean_shares, normalize, wasserstein_1
from megatron_ext.align.jsonl import Trace
from megatron_ext.align.profile import ProfileConfig, TraceProfile, profile_file
from megatron_ext.align.score import FEATURES, PULL_DOWN, Reference, TraceScore

LoglikFn = Callable[[List[str], List[str]], Sequence[float]]


@dataclasses.dataclass
class Comparison:
    reference_path: str
    candidate_path: str
    config: ProfileConfig
    reference: Reference
    traces: List[TraceScore]
    columns: Dict[str, np.ndarray]  # candidate feature values, as Reference.columns
    distributions: Dict[str, Dict[str, Dict[str, float]]]  # notation/script/tags: reference and candidate shares
    malformed: Dict[str, List[str]]  # "reference"/"candidate" -> skipped lines (path:line: why)

    @property
    def dataset_score(self) -> float:
        """Mean trace score: the share of the set that is in the target style, softly counted."""
        return float(np.mean([t.score for t in self.traces]))

    def divergences(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name, ref in self.reference.columns.items():
            w1 = wasserstein_1(ref, self.columns[name])
            out[name] = {"ks": ks_statistic(ref, self.columns[name]), "wasserstein": w1,
                         "wasserstein_scaled": w1 / self.reference.ranges[name].scale}
        for name, d in self.distributions.items():
            out[name] = {"js": js_divergence(d["reference"], d["candidate"])}
        return out

    def reason_counts(self, below: float = math.inf) -> Dict[str, int]:
        """How many traces (scoring under `below`) each feature pulls down, most first."""
        counts = collections.Counter(name for t in self.traces if t.score < below
                                     for name, s in t.feature_scores.items() if s < PULL_DOWN)
        return dict(counts.most_common())

    def to_json(self) -> dict:
        divergences = self.divergences()
        features = {}
        for name, r in self.reference.ranges.items():
            features[name] = {
                "description": FEATURES[name],
                "reference": dataclasses.asdict(r),
                "candidate_median": float(np.median(self.columns[name])),
                "mean_score": float(np.mean([t.feature_scores[name] for t in self.traces])),
                **divergences[name],
            }
        distributions = {name: {**d, **divergences[name]} for name, d in self.distributions.items()}
        distributions["script"]["mean_score"] = float(np.mean([t.feature_scores["script"] for t in self.traces]))
        return {
            "dataset_score": self.dataset_score,
            "reference": {"path": self.reference_path, "n_traces": self.reference.n},
            "candidate": {"path": self.candidate_path, "n_traces": len(self.traces)},
            "profile_config": dataclasses.asdict(self.config),
            "uses_loglik": self.reference.uses_loglik,
            "features": features,
            "distributions": distributions,
            "reason_counts": self.reason_counts(),
            "malformed": self.malformed,
            "traces": [t.to_json() for t in self.traces],
        }


def _with_logliks(pairs: Iterable[Tuple[Trace, TraceProfile]], loglik_fn: Optional[LoglikFn],
                  batch_size: int) -> Iterator[Tuple[Trace, TraceProfile, Optional[float]]]:
    batch: List[Tuple[Trace, TraceProfile]] = []

    def flush():
        if loglik_fn is None:
            return [None] * len(batch)
        values = list(loglik_fn([t.prompt for t, _ in batch], [t.response for t, _ in batch]))
        if len(values) != len(batch):
            raise ValueError(f"loglik_fn returned {len(values)} values for {len(batch)} traces; it must return one "
                             "length-normalised log-likelihood per (prompt, response) pair")
        bad = [(t.line, v) for (t, _), v in zip(batch, values) if not math.isfinite(float(v))]
        if bad:
            raise ValueError(f"loglik_fn returned non-finite log-likelihoods (line, value): {bad[:5]}; "
                             "it must return finite per-token means")
        return [float(v) for v in values]

    for pair in pairs:
        batch.append(pair)
        if len(batch) == batch_size:
            yield from ((t, p, ll) for (t, p), ll in zip(batch, flush()))
            batch = []
    if batch:
        yield from ((t, p, ll) for (t, p), ll in zip(batch, flush()))


def compare(reference: str, candidate: str, *, config: ProfileConfig = ProfileConfig(),
            loglik_fn: Optional[LoglikFn] = None, batch_size: int = 64,
            skip_malformed: bool = False) -> Comparison:
    """Score every candidate trace against the reference set (both JSONL paths).

    Malformed lines raise TraceFormatError (path:line) unless skip_malformed, in which case
    they are listed in Comparison.malformed and left out.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    malformed: Dict[str, List[str]] = {"reference": [], "candidate": []}
    ref_sink, cand_sink = (malformed["reference"], malformed["candidate"]) if skip_malformed else (None, None)
    ref_rows = list(_with_logliks(profile_file(reference, config, ref_sink), loglik_fn, batch_size))
    ref = Reference([p for _, p, _ in ref_rows], [ll for _, _, ll in ref_rows] if loglik_fn else None)
    traces: List[TraceScore] = []
    symbols, tags, scripts = [], [], collections.Counter()
    for trace, profile, ll in _with_logliks(profile_file(candidate, config, cand_sink), loglik_fn, batch_size):
        traces.append(ref.score(len(traces), trace.line, profile, ll))
        symbols.append(profile.symbols)
        tags.append(profile.tags)
        scripts[profile.script] += 1
    if not traces:
        raise ValueError(f"the candidate set {candidate} has no valid traces; nothing to compare")
    distributions = {
        "notation": {"reference": ref.symbol_centroid, "candidate": mean_shares(symbols)},
        "script": {"reference": ref.script_share, "candidate": normalize(scripts)},
        "tags": {"reference": ref.tag_centroid, "candidate": mean_shares(tags)},
    }
    columns = {name: np.array([t.features[name] for t in traces]) for name in ref.columns}
    return Comparison(str(reference), str(candidate), config, ref, traces, columns, distributions, malformed)
