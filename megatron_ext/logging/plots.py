"""A run's curves from RUN_DIR/metrics.jsonl as PNGs under RUN_DIR/plots/, without W&B: clusters
are often offline. One PNG per curve; a curve is drawn only when its keys were logged, so the
same call serves SFT/pretraining and RL runs."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = Tuple[List[float], List[float]]  # steps, values (NaN where a record had None)


class PlotError(ValueError):
    """No records to draw; the message names the file and the fix."""


@dataclass(frozen=True)
class Curve:
    name: str  # the PNG's file name, without .png
    title: str
    lines: Tuple[Tuple[str, str], ...]  # (split, metrics key); the key labels its line


CURVES = (
    Curve("loss", "training loss", (("train", "loss"),)),  # RL: the policy objective
    Curve("heldout_loss", "held-out loss", (("eval", "loss"),)),
    Curve("lr", "learning rate", (("train", "lr"),)),
    Curve("grad_norm", "gradient norm", (("train", "grad_norm"),)),
    Curve("tokens_per_s", "tokens/s", (("train", "tokens_per_s"),)),
    Curve("accuracy", "held-out accuracy", (("eval", "accuracy"),)),
    Curve("reward", "reward (mean over samples)", (("train", "reward_mean"),)),
    Curve("kl", "KL to the reference policy", (("train", "kl_ref"),)),
    Curve("clip_frac", "PPO clip fractions", (("train", "clip_frac"), ("train", "clip_frac_low"),
                                              ("train", "clip_frac_high"))),
    Curve("zero_adv_frac", "share of groups with zero advantage", (("train", "zero_adv_frac"),)),
    Curve("response_len", "response length (tokens)", (("train", "response_len"),)),
)


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"{path} does not exist; give the run directory a training run wrote "
                        "(it holds config.yaml and metrics.jsonl)")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise PlotError(f"{path} is empty: the run logged no step yet; plot it after the "
                        "first logged step (train.log_interval)")
    return records


def curve_data(records: List[Dict]) -> Dict[str, Dict[str, Series]]:
    """{curve name: {key: (steps, values)}} for every curve with a logged key. A None or
    non-finite value (a skipped step) stays as NaN, so the line shows a gap there."""
    out: Dict[str, Dict[str, Series]] = {}
    for curve in CURVES:
        lines = {}
        for split, key in curve.lines:
            rows = [r for r in records if r.get("split", "train") == split and key in r]
            if rows:
                lines[key] = ([r["step"] for r in rows],
                                [math.nan if r[key] is None else float(r[key]) for r in rows])
        if lines:
            out[curve.name] = lines
    return out


def _draw(path: str, title: str, lines: Dict[str, Series]) -> None:
    # Figure + Agg canvas, not pyplot: no global backend state in the trainer's process.
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, (steps, values) in lines.items():
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)  # fixed: tight_layout is slow
    fig.savefig(path, dpi=80)


def write_plots(run_dir: str) -> List[str]:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/plots/<curve>.png; returns the paths written."""
    data = curve_data(read_metrics(run_dir))
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for curve in CURVES:
        if curve.name in data:
            written.append(os.path.join(out_dir, f"{curve.name}.png"))
            _draw(written[-1], curve.title, data[curve.name])
    return written
