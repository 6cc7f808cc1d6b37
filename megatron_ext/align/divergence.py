"""Distances between two samples (KS, Wasserstein-1) and two categorical distributions (JS).

Written with numpy alone so the align tools add no dependency; the formulas are the textbook
ones (and agree with scipy.stats.ks_2samp / wasserstein_distance / scipy's jensenshannon**2).
"""
from __future__ import annotations

import collections
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np

NONE_KEY = "<none>"  # the category of a trace that has no symbol (or tag) at all


def _sorted(values: Sequence[float], name: str) -> np.ndarray:
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        raise ValueError(f"{name} sample is empty; a distance needs at least one value on each side")
    return x


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest gap between the two empirical CDFs, in [0, 1]."""
    a, b = _sorted(a, "first"), _sorted(b, "second")
    grid = np.concatenate([a, b])
    gap = np.searchsorted(a, grid, side="right") / a.size - np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(gap)))


def wasserstein_1(a: Sequence[float], b: Sequence[float]) -> float:
    """Earth mover's distance: the area between the two empirical CDFs, in the values' unit."""
    a, b = _sorted(a, "first"), _sorted(b, "second")
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, grid[:-1], side="right") / a.size
    cdf_b = np.searchsorted(b, grid[:-1], side="right") / b.size
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(grid)))


def normalize(counts: Mapping[str, float]) -> dict:
    """Counts to shares; an empty or all-zero mapping becomes {NONE_KEY: 1}."""
    total = float(sum(counts.values()))
    return {k: v / total for k, v in counts.items() if v} if total > 0 else {NONE_KEY: 1.0}


def mean_shares(counts: Iterable[Mapping[str, float]]) -> Dict[str, float]:
    """The average of the normalised distributions, so every trace weighs the same whatever its length."""
    total: Dict[str, float] = collections.defaultdict(float)
    n = 0
    for c in counts:
        n += 1
        for k, v in normalize(c).items():
            total[k] += v
    return {k: v / n for k, v in total.items()}


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence in bits, in [0, 1]; both sides are normalised first."""
    p, q = normalize(p), normalize(q)
    keys = sorted(set(p) | set(q))
    pv = np.array([p.get(k, 0.0) for k in keys])
    qv = np.array([q.get(k, 0.0) for k in keys])
    m = (pv + qv) / 2

    def kl_to_m(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(min(1.0, max(0.0, 0.5 * kl_to_m(pv) + 0.5 * kl_to_m(qv))))
