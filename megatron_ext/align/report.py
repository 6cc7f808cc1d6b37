"""Write a Comparison as report.json, a Markdown summary and side-by-side PNG histograms."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_ext.align.compare import Comparison
from megatron_ext.align.score import FEATURES, RANGE_QUANTILES

PLOTTED = ("n_steps", "tokens_per_step", "total_tokens", "ops_per_step", "word_frac", "latex_frac",
           "repetition", "notation_js", "loglik")
WORST_SHOWN = 10


def _bins(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if np.all(values == np.round(values)) and hi - lo <= 40:  # small integers: one bar per value
        return np.arange(lo - 0.5, hi + 1.5)
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5])
    return np.histogram_bin_edges(values, bins=30)


def _histogram(path: str, name: str, reference: np.ndarray, candidate: np.ndarray) -> None:
    # Figure + Agg canvas, not pyplot: no global backend state in the trainer's process.
    fig = Figure(figsize=(10, 3.4))
    FigureCanvasAgg(fig)
    bins = _bins(np.concatenate([reference, candidate]))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, values, label, color in ((axes[0], reference, "reference", "tab:blue"),
                                     (axes[1], candidate, "candidate", "tab:orange")):
        ax.hist(values, bins=bins, weights=np.full(values.size, 1.0 / values.size), color=color, edgecolor="white")
        ax.set_title(f"{label} (n={values.size})")
        ax.set_xlabel(name)
    axes[0].set_ylabel("share of traces")
    fig.suptitle(FEATURES[name])
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.82, wspace=0.08)  # fixed: tight_layout is slow
    fig.savefig(path, dpi=80)


def _score_histogram(path: str, scores: np.ndarray) -> None:
    fig = Figure(figsize=(5, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(scores, bins=np.linspace(0, 1, 21), weights=np.full(scores.size, 1.0 / scores.size), color="tab:orange")
    ax.set_xlabel("trace fidelity score")
    ax.set_ylabel("share of candidate traces")
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.16, top=0.95)
    fig.savefig(path, dpi=80)


def _top(shares: Dict[str, float], k: int = 4) -> str:
    return ", ".join(f"`{key}` {v:.0%}" for key, v in sorted(shares.items(), key=lambda kv: -kv[1])[:k])


def _markdown(report: dict, images: List[str]) -> str:
    ref, cand, cfg = report["reference"], report["candidate"], report["profile_config"]
    lo, hi = (f"{q:.0%}" for q in RANGE_QUANTILES)
    out = [
        "# Reasoning-trace format fidelity", "",
        f"Dataset score: **{report['dataset_score']:.3f}** (mean of the per-trace scores, 0..1; 1 = in the reference style)", "",
        f"Reference `{ref['path']}` ({ref['n_traces']} traces), candidate `{cand['path']}` ({cand['n_traces']} traces). "
        f"Steps split by `{cfg['steps']}`, answer line `{cfg['answer_pattern']}`, lengths in bytes (byte-level tokens).", "",
        "## Features", "",
        f"| feature | what it measures | reference range [{lo}, {hi}] | reference median | candidate median | KS "
        "| W1 / scale | mean score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in report["features"].items():
        r = f["reference"]
        out.append(f"| {name} | {f['description']} | [{r['lo']:.3g}, {r['hi']:.3g}] | {r['median']:.3g} | {f['candidate_median']:.3g} "
                   f"| {f['ks']:.3f} | {f['wasserstein_scaled']:.3g} | {f['mean_score']:.3f} |")
    out += ["", "## Distributions", "", "| distribution | JS (bits) | reference | candidate |", "|---|---|---|---|"]
    for name, d in report["distributions"].items():
        out.append(f"| {name} | {d['js']:.3f} | {_top(d['reference'])} | {_top(d['candidate'])} |")
    out += ["", "## What pulls scores down", "", "| feature | traces pulled down |", "|---|---|"]
    out += [f"| {name} | {n} |" for name, n in report["reason_counts"].items()] or ["| (none) | 0 |"]
    out += ["", "## Lowest-scoring traces", ""]
    for t in sorted(report["traces"], key=lambda t: t["score"])[:WORST_SHOWN]:
        out.append(f"- index {t['index']} (line {t['line']}), score {t['score']:.3f}: "
                   + ("; ".join(t["reasons"]) or "no feature outside the reference range"))
    skipped = [m for side in report["malformed"].values() for m in side]
    if skipped:
        out += ["", f"## Malformed lines skipped ({len(skipped)})", ""] + [f"- {m}" for m in skipped[:50]]
    out += ["", "## Histograms", ""] + [f"![{os.path.splitext(i)[0]}]({i})" for i in images]
    return "\n".join(out) + "\n"


def write_report(comparison: Comparison, out_dir: str) -> List[str]:
    """Write report.json, report.md and hist_*.png into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    report = comparison.to_json()
    images = []
    for name in PLOTTED:
        if name in comparison.columns:
            images.append(f"hist_{name}.png")
            _histogram(os.path.join(out_dir, images[-1]), name, comparison.reference.columns[name], comparison.columns[name])
    images.append("hist_score.png")
    _score_histogram(os.path.join(out_dir, images[-1]), np.array([t.score for t in comparison.traces]))
    paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(_markdown(report, images))
    return paths + [os.path.join(out_dir, i) for i in images]
