"""Offline plots of a run: which PNGs a metrics.jsonl gives, that they are PNGs, and that each
drawn line holds exactly the logged points (read back from matplotlib before saving)."""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from megatron_ext import plot
from megatron_ext.logging.plots import write_plots

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
RL_KEYS = ("reward_mean", "kl_ref", "clip_frac", "clip_frac_low", "clip_frac_high",
           "zero_adv_frac", "response_len")


def _records(rl: bool):
    train = [{"step": s, **{k: 0.1 * s + i for i, k in enumerate(TRAIN_KEYS)},
              **({k: 0.01 * s + i for i, k in enumerate(RL_KEYS)} if rl else {})}
             for s in (1, 2, 3, 4)]
    train[2]["loss"] = None  # MetricsWriter writes a non-finite loss as null
    train[1]["grad_norm"] = math.nan  # and a NaN, should one come in unconverted
    evals = [{"step": s, "split": "eval", "loss": 5.0 - s, "accuracy": 0.1 * s, "samples": 8}
             for s in (0, 4)]
    fidelity = {"step": 0, "split": "fidelity", "dataset_score": 0.9}  # not a curve
    return [fidelity, evals[0], *train, evals[1]]


def _write(run_dir, records):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def drawn(monkeypatch):
    """{png path: {line label: (x, y)}} of every figure saved, read from its Line2D objects."""
    lines, save = {}, Figure.savefig

    def spy(fig, path, *args, **kwargs):
        ax, = fig.axes
        lines[str(path)] = {l.get_label(): (np.asarray(l.get_xdata(), float),
                                            np.asarray(l.get_ydata(), float))
                            for l in ax.get_lines()}
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return lines


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def _expected(records, split, key):
    rows = [r for r in records if r.get("split", "train") == split and key in r]
    return (np.array([r["step"] for r in rows], float),
            np.array([math.nan if r[key] is None else r[key] for r in rows], float))


def test_rl_run_draws_every_curve_with_its_logged_points(tmp_path, drawn):
    run_dir, records = str(tmp_path / "run"), _records(rl=True)
    _write(run_dir, records)
    paths = write_plots(run_dir)
    names = ["loss", "heldout_loss", "lr", "grad_norm", "tokens_per_s", "accuracy", "reward",
             "kl", "clip_frac", "zero_adv_frac", "response_len"]
    assert paths == [os.path.join(run_dir, "plots", f"{n}.png") for n in names]
    for path in paths:
        assert _png_size(path) == (480, 288)
    curves = {os.path.basename(p)[:-4]: drawn[p] for p in paths}
    wanted = {"loss": [("train", "loss")], "heldout_loss": [("eval", "loss")],
              "lr": [("train", "lr")], "grad_norm": [("train", "grad_norm")],
              "tokens_per_s": [("train", "tokens_per_s")], "accuracy": [("eval", "accuracy")],
              "reward": [("train", "reward_mean")], "kl": [("train", "kl_ref")],
              "clip_frac": [("train", k) for k in ("clip_frac", "clip_frac_low",
                                                   "clip_frac_high")],
              "zero_adv_frac": [("train", "zero_adv_frac")],
              "response_len": [("train", "response_len")]}
    for name, lines in wanted.items():
        assert sorted(curves[name]) == sorted(key for _, key in lines), name
        for split, key in lines:
            x, y = curves[name][key]
            ex, ey = _expected(records, split, key)
            np.testing.assert_array_equal(x, ex, err_msg=f"{name}/{key} steps")
            np.testing.assert_array_equal(y, ey, err_msg=f"{name}/{key} values")  # NaN == NaN
    assert np.isnan(curves["loss"]["loss"][1][2]) and np.isnan(curves["grad_norm"]["grad_norm"][1][1])
    np.testing.assert_array_equal(curves["heldout_loss"]["loss"][0], [0, 4])


def test_sft_run_draws_only_the_curves_it_logged(tmp_path, drawn):
    run_dir = str(tmp_path / "run")
    _write(run_dir, _records(rl=False))
    names = sorted(os.path.basename(p) for p in write_plots(run_dir))
    assert names == sorted(f"{n}.png" for n in ("loss", "heldout_loss", "lr", "grad_norm",
                                                "tokens_per_s", "accuracy"))
    assert sorted(os.listdir(os.path.join(run_dir, "plots"))) == names


def test_missing_or_empty_metrics_exit_2_with_one_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.plot", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert f"{tmp_path}/metrics.jsonl does not exist" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert plot.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is empty" in err
    assert not (tmp_path / "plots").exists()
