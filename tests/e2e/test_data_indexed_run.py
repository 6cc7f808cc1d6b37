"""From the CLI: preprocess two corpora, pretrain on their blend at PP3 (a middle stage that
reads no tokens), and a run killed mid-way resumes at the exact sample (identical losses)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.kill import sigkill_when_logged

STEPS = 6


def _preprocess(tmp, name, letter):
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": f"{letter * (3 + i % 40)} {i}"}) + "\n"
                           for i in range(300)))
    out = subprocess.run([sys.executable, "-m", "megatron_ext.data.preprocess", "--input",
                          str(src), "--output-prefix", str(tmp / "data" / name), "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "300 documents" in out.stdout
    return str(tmp / "data" / name)


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    return f"[0.7,{_preprocess(tmp, 'a', 'a')},0.3,{_preprocess(tmp, 'b', 'b')}]"


def _cmd(blend, run_dir):
    return [sys.executable, "-m", "launch", "local", "--nproc", "3", "--", "stage=pretrain",
            "data=indexed", f"data.blend={blend}", "data.split=[98,2,0]", "logging=none",
            "model.num_layers=3", "parallel.pp=3", "model.vocab_size=512", "train.seq_len=32",
            "train.micro_batch_size=2", "train.global_batch_size=8", f"train.steps={STEPS}",
            "train.save_interval=3", "train.eval_samples=8", f"run.dir={run_dir}"]


def _train_records(run_dir):
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in recs if "split" not in r]


def test_pp3_blend_trains_and_resumes_at_the_exact_sample(blend, tmp_path):
    ref = str(tmp_path / "ref")
    done = subprocess.run(_cmd(blend, ref), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out loss" in done.stdout
    assert len(_train_records(ref)) == STEPS

    run = str(tmp_path / "run")
    assert sigkill_when_logged(_cmd(blend, run), 4) == -signal.SIGKILL
    again = subprocess.run(_cmd(blend, run), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert _train_records(run) == _train_records(ref)
