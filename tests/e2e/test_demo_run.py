"""A short demo-shaped run (TP=2 x PP=2, 4 processes): progress lines, falling loss, held-out
accuracy, and the run-directory contract (config.yaml, metrics.jsonl, offline W&B run)."""
import json
import os
import subprocess
import sys

import yaml


def test_tp2_pp2_run_trains_and_reports(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "local", "--nproc", "4", "--", "train=demo",
         "parallel.tp=2", "parallel.pp=2", "train.steps=40", "train.log_interval=5",
         "train.eval_interval=0", "train.eval_samples=32", "train.warmup_steps=5",
         f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    progress = [l for l in lines if l.startswith("step ")]
    assert len(progress) == 8
    for key in ("loss", "lr", "grad-norm", "tok/s", "eta"):
        assert f"| {key} " in progress[0]
    assert any("held-out accuracy" in l for l in lines)
    # no GPU here: NVML is absent, one notice from the node's local rank 0, training goes on
    assert sum(l.startswith("NVML unavailable on ") for l in lines) == 1

    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") != "eval"]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in train[0]
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert len(evals) == 1 and evals[0]["step"] == 40 and 0.0 <= evals[0]["accuracy"] <= 1.0
    assert evals[0]["samples"] == 32

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["parallel"]["tp"] == 2 and cfg["train"]["steps"] == 40
    assert (run_dir / "wandb_run_id").exists()
    offline = [d for d in os.listdir(run_dir / "wandb" / "wandb") if d.startswith("offline-run")]
    assert len(offline) == 1
