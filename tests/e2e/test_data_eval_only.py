"""train.steps=0 scores weights and exits: a resumed checkpoint's held-out loss equals the eval
its own run wrote at that step, and a fresh run evaluates the seed's weights and saves nothing."""
import json
import os
import subprocess
import sys

BASE = ["logging=none", "model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.eval_samples=8", "data.num_samples=256"]


def _run(args):
    proc = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "1", "--", *BASE,
                           *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _evals(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if r.get("split") == "eval"]


def test_steps_zero_evaluates_the_checkpoint_and_exits(tmp_path):
    train = str(tmp_path / "train")
    _run(["train.steps=4", "train.save_interval=4", f"run.dir={train}"])
    ckpt = os.path.join(train, "checkpoints", "step_00000004")
    score = str(tmp_path / "score")
    out = _run(["train.steps=0", f"train.resume={ckpt}", "train.save_interval=4",
                f"run.dir={score}"])
    assert not [line for line in out.splitlines() if line.startswith("step ")]  # no training
    [got], [want] = _evals(score), _evals(train)
    assert got["step"] == want["step"] == 4 and got["loss"] == want["loss"]
    assert not os.path.exists(os.path.join(score, "checkpoints", "step_00000004"))
    fresh = str(tmp_path / "fresh")
    _run(["train.steps=0", "train.save_interval=4", f"run.dir={fresh}"])
    [rec] = _evals(fresh)
    assert rec["step"] == 0 and rec["loss"] > want["loss"]  # the seed's weights, untrained
    ckpts = os.path.join(fresh, "checkpoints")
    assert not os.path.isdir(ckpts) or not os.listdir(ckpts)
