"""Exact resume after SIGKILL at random steps, fallback past corrupt checkpoints, and resuming
on another layout (DP2 -> DP1, DP2 -> TP2) through dist_checkpointing's resharding."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e.kill import sigkill_when_logged

STEPS = 8
BASE = ["logging=none", "model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", f"train.steps={STEPS}", "train.save_interval=2",
        "train.eval_samples=8", "data.num_samples=512"]


def _cmd(run_dir, nproc=2, extra=()):
    return [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--", *BASE,
            *extra, f"run.dir={run_dir}"]


def _run(run_dir, **kw):
    proc = subprocess.run(_cmd(run_dir, **kw), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _metrics(run_dir):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if "split" not in r]


def _state(run_dir, step, tmp_path):
    out = str(tmp_path / f"{os.path.basename(run_dir)}_{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), out)
    return {k: v for k, v in torch.load(out, weights_only=True).items()
            if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    _run(run_dir)
    return run_dir


def _kill_at(run_dir, step, extra=()):
    """Start the run and SIGKILL every process of it once step `step` is logged."""
    assert sigkill_when_logged(_cmd(run_dir, extra=extra), step) == -signal.SIGKILL


@pytest.mark.parametrize("kill_step", sorted(random.Random(2026).sample(range(3, STEPS), 3)))
def test_sigkill_then_resume_is_bit_exact(reference, tmp_path, kill_step):
    run_dir = str(tmp_path / "run")
    _kill_at(run_dir, kill_step)
    out = _run(run_dir)
    assert "resumed from" in out
    assert _metrics(run_dir) == _metrics(reference)  # every step once, identical floats
    got, want = _state(run_dir, STEPS, tmp_path), _state(reference, STEPS, tmp_path)
    assert got.keys() == want.keys() and len(want) > 10
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_corrupt_checkpoints_fall_back_to_the_last_good_one(reference, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    os.remove(os.path.join(run_dir, "metrics.jsonl"))
    ckpts = os.path.join(run_dir, "checkpoints")
    newest, older = os.path.join(ckpts, "step_00000008"), os.path.join(ckpts, "step_00000006")
    distcp = sorted(f for f in os.listdir(newest) if f.endswith(".distcp"))[0]
    with open(os.path.join(newest, distcp), "r+b") as f:  # flip bytes
        f.seek(100)
        f.write(b"\x00\xff" * 4)
    with open(os.path.join(older, "common.pt"), "r+b") as f:  # truncate
        f.truncate(5)
    out = _run(run_dir)
    assert f"checkpoint {newest} is unusable: file {distcp} fails its sha256 check" in out
    assert f"checkpoint {older} is unusable: file common.pt has 5 bytes" in out
    assert "resumed from " + os.path.join(ckpts, "step_00000004") in out
    assert [m[0] for m in _metrics(run_dir)] == [5, 6, 7, 8]
    assert _metrics(run_dir) == _metrics(reference)[4:]


@pytest.mark.parametrize("nproc, extra, layout", [(1, [], "world_size 2 -> 1, dp 2 -> 1"),
                                                  (2, ["parallel.tp=2"], "tp 1 -> 2")])
def test_resume_on_another_layout(reference, tmp_path, nproc, extra, layout):
    run_dir = str(tmp_path / "run")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    shutil.copytree(os.path.join(reference, "checkpoints", "step_00000004"),
                    os.path.join(run_dir, "checkpoints", "step_00000004"))
    out = _run(run_dir, nproc=nproc, extra=extra)
    assert f"resuming step 4 with a new layout ({layout}" in out
    got, want = _metrics(run_dir), _metrics(reference)[4:]
    assert [g[0] for g in got] == [5, 6, 7, 8]
    for (_, loss, gnorm, lr), (_, rloss, rgnorm, rlr) in zip(got, want):
        assert abs(loss - rloss) < 1e-5 and abs(gnorm - rgnorm) < 1e-4 and lr == rlr


def test_async_saves_resume_bit_exact_after_sigkill(reference, tmp_path):
    """train.async_save: checkpoints written in the background, the run killed right after a
    save was started (step 5: the one of step 4 may still be in flight) and resumed, also in
    the background, end identical to the reference's synchronous saves."""
    run_dir = str(tmp_path / "run")
    _kill_at(run_dir, 5, extra=["train.async_save=true"])
    out = _run(run_dir, extra=["train.async_save=true"])
    assert "resumed from" in out and "in the background" in out
    assert _metrics(run_dir) == _metrics(reference)
    got, want = _state(run_dir, STEPS, tmp_path), _state(reference, STEPS, tmp_path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_usr1_saves_exits_for_requeue_and_resumes_exactly(reference, tmp_path):
    """SLURM's preemption warning, sent to the launcher (which forwards it to every rank)."""
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen(_cmd(run_dir), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step     3/"):
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 75  # REQUEUE_EXIT_CODE
    stopped = next(l for l in lines if l.startswith("stopping at step"))
    assert "SIGUSR1: exiting for requeue" in stopped
    step = int(stopped.split()[3])
    assert any(l.startswith(f"saved checkpoint") and l.rstrip().endswith(f"step_{step:08d}")
               for l in lines)
    out = _run(run_dir)
    assert f"at step {step}" in out
    assert _metrics(run_dir) == _metrics(reference)
    got, want = _state(run_dir, STEPS, tmp_path), _state(reference, STEPS, tmp_path)
    assert all(torch.equal(got[k], want[k]) for k in want)
