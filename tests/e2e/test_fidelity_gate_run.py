"""data.fidelity_gate in a real SFT run: `fail` stops before any step, `filter` trains on the
traces that pass."""
import json
import os
import subprocess
import sys

from megatron_ext.align.synth import write_traces


def _run(tmp_path, action, candidate):
    ref = tmp_path / "ref.jsonl"
    write_traces(str(ref), 200, "target", seed=1, min_ops=2, max_ops=3)
    run_dir = tmp_path / f"run_{action}"
    return run_dir, subprocess.run(
        [sys.executable, "-m", "launch", "local", "--nproc", "2", "--", "logging=none",
         "data=jsonl", f"data.path={candidate}", "data.fidelity_gate.enabled=true",
         f"data.fidelity_gate.reference={ref}", "data.fidelity_gate.min_dataset_score=0.9",
         "data.fidelity_gate.min_trace_score=0.5", f"data.fidelity_gate.action={action}",
         "train.steps=2", f"run.dir={run_dir}"], capture_output=True, text=True, timeout=300)


def _mixed(tmp_path):
    path = tmp_path / "cand.jsonl"
    write_traces(str(tmp_path / "a.jsonl"), 60, "target", seed=2, min_ops=2, max_ops=3)
    write_traces(str(tmp_path / "b.jsonl"), 40, "verbose", seed=3, min_ops=2, max_ops=3)
    path.write_text((tmp_path / "a.jsonl").read_text() + (tmp_path / "b.jsonl").read_text())
    return path


def test_fail_action_stops_before_any_training_step(tmp_path):
    run_dir, proc = _run(tmp_path, "fail", _mixed(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fidelity gate:" in proc.stderr and "data.fidelity_gate.min_dataset_score=0.9" in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "fidelity" / "report.json").exists()


def test_filter_action_trains_on_the_kept_traces(tmp_path):
    run_dir, proc = _run(tmp_path, "filter", _mixed(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = (run_dir / "fidelity" / "kept.jsonl").read_text().splitlines()
    assert len(kept) == 60 and all("Step 1:" not in json.loads(l)["response"] for l in kept)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
