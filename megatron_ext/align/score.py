"""Per-trace fidelity: how far each feature of a trace lies outside the range of the reference set.

Each feature scores 1 inside the reference's [1%, 99%] quantile range and falls off with a
Gaussian tail outside it, exp(-(gap / scale)**2 / 2), where scale is the reference's spread (IQR,
at least 10% of the median, at least a per-feature floor): 0.61 one scale out, 0.01 three out.
Scoring against a range rather than a density keeps every aligned trace at ~1 whatever the
problem mix, forgives traces just past the edge, and drops a wordier, coarser or otherwise
notated trace fast. The trace score is the product of its feature scores, so every feature has
to be in style; its reasons name each feature that costs it more than 1%.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_ext.align.divergence import js_divergence, mean_shares, normalize
from megatron_ext.align.profile import NUMERIC_FEATURES, TraceProfile

FEATURES = {
    **NUMERIC_FEATURES,
    "notation_js": "Jensen-Shannon divergence of the symbol mix from the reference's",
    "loglik": "length-normalised log-likelihood under the target model",
    "script": "writing system of the letters (language)",
}
# Smallest scale per feature, for when the reference barely varies (e.g. no LaTeX line at all).
FLOORS = {"n_steps": 1.0, "tokens_per_step": 2.0, "total_tokens": 8.0, "ops_per_step": 0.25,
          "latex_frac": 0.05, "word_frac": 0.05, "repetition": 0.05, "answer_format": 0.05,
          "n_tags": 1.0, "notation_js": 0.05, "loglik": 0.1}
ONE_SIDED = ("loglik",)  # only lower is worse: a trace the target model finds likelier is fine
RANGE_QUANTILES = (0.01, 0.99)
RELATIVE_SCALE = 0.1
PULL_DOWN = 0.99  # a feature scoring below this is named as a reason (it costs the trace over 1%)
RARE_SHARE = 0.05  # a script used by fewer reference traces than this is penalised in proportion


@dataclasses.dataclass(frozen=True)
class FeatureRange:
    lo: float
    hi: float
    median: float
    scale: float

    @classmethod
    def fit(cls, values: np.ndarray, floor: float) -> "FeatureRange":
        lo, q1, median, q3, hi = np.quantile(values, [RANGE_QUANTILES[0], 0.25, 0.5, 0.75, RANGE_QUANTILES[1]])
        return cls(float(lo), float(hi), float(median), float(max(q3 - q1, RELATIVE_SCALE * abs(median), floor)))

    def score(self, value: float, one_sided: bool = False) -> float:
        gap = max(self.lo - value, 0.0 if one_sided else value - self.hi, 0.0)
        return math.exp(-0.5 * (gap / self.scale) ** 2)


@dataclasses.dataclass
class TraceScore:
    index: int  # position among the candidate file's valid traces, from 0
    line: int  # line number in the candidate file
    score: float
    reasons: List[str]  # one line per feature that pulls the score down, worst first
    feature_scores: Dict[str, float]
    features: Dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Reference:
    """What the target style looks like: feature ranges, the notation centroid, script shares."""

    def __init__(self, profiles: Sequence[TraceProfile], logliks: Optional[Sequence[float]] = None):
        if not profiles:
            raise ValueError("the reference set has no valid traces; give a JSONL file of traces in the target style")
        self.n = len(profiles)
        self.symbol_centroid = mean_shares(p.symbols for p in profiles)
        self.tag_centroid = mean_shares(p.tags for p in profiles)
        self.script_share = normalize(collections.Counter(p.script for p in profiles))
        rows = [self.features(p) for p in profiles]
        if logliks is not None:
            for row, ll in zip(rows, logliks):
                row["loglik"] = ll
        self.columns = {name: np.array([row[name] for row in rows]) for name in rows[0]}
        self.ranges = {name: FeatureRange.fit(values, FLOORS[name]) for name, values in self.columns.items()}

    @property
    def uses_loglik(self) -> bool:
        return "loglik" in self.ranges

    def features(self, profile: TraceProfile, loglik: Optional[float] = None) -> Dict[str, float]:
        row = profile.numeric()
        row["notation_js"] = js_divergence(profile.symbols, self.symbol_centroid)
        if loglik is not None:
            row["loglik"] = float(loglik)
        return row

    def score(self, index: int, line: int, profile: TraceProfile, loglik: Optional[float] = None) -> TraceScore:
        if self.uses_loglik != (loglik is not None):
            raise ValueError("reference and candidate must both have log-likelihoods or both lack them; "
                             "pass the same loglik_fn for both")
        row = self.features(profile, loglik)
        scores = {name: self.ranges[name].score(value, name in ONE_SIDED) for name, value in row.items()}
        share = self.script_share.get(profile.script, 0.0)
        scores["script"] = min(1.0, share / RARE_SHARE)
        total = math.prod(scores.values())
        reasons = []
        for name, s in sorted(scores.items(), key=lambda kv: kv[1]):
            if s >= PULL_DOWN:
                break
            if name == "script":
                reasons.append(f"script={profile.script} is used by {share:.1%} of reference traces "
                               f"(feature score {s:.2f})")
                continue
            r, value = self.ranges[name], row[name]
            side = "below" if value < r.lo else "above"
            reason = f"{name}={value:.3g} {side} reference range [{r.lo:.3g}, {r.hi:.3g}] (feature score {s:.2f})"
            if name == "notation_js":
                top = sorted(profile.symbols.items(), key=lambda kv: -kv[1])[:3]
                total_symbols = sum(profile.symbols.values())
                reason += "; its top symbols: " + (", ".join(f"{k!r} {v / total_symbols:.0%}" for k, v in top) or "none")
            reasons.append(reason)
        return TraceScore(index, line, total, reasons, scores, row)
