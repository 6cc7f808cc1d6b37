"""The same run on every layout, through the CLI: one process, TP2, PP2, TP2 x PP2,
PP2 x VPP2 and DP2 with the default vocab and the same seed log the same losses.

The default vocab is the byte tokenizer's 259 tokens, which megatron pads to 384 rows at TP1
and 512 at TP2: equal losses need the padding out of the softmax (else step 1 is ln 384 vs
ln 512) and initial weights that do not depend on the pipeline layout (else each stage draws
its layers from its own RNG stream)."""
import json
import math
import os
import subprocess
import sys

import pytest

TOL = 1e-5
BASE = ["model=tiny", "train.steps=4", "logging=none", "seed=1234", "train.eval_samples=8",
        "data.num_samples=512"]  # 4 steps need 64 rows; building 20000 problems costs 2 s a rank
LAYOUTS = {  # name: (processes, overrides); tiny has 4 layers, so pp*vpp = 4 divides them
    "one_process": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"]),
    "dp2": (2, []),
}


def _run(nproc, overrides, run_dir, tmp):
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--", *BASE,
           *overrides, f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r["loss"] for r in records if "split" not in r]
    evals = [r["loss"] for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3, 4]
    return train, evals


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    tmp = tmp_path_factory.mktemp("tmpdir")
    return {name: _run(nproc, overrides, root / name, tmp)
            for name, (nproc, overrides) in LAYOUTS.items()}


def test_first_loss_is_over_the_real_vocab(losses):
    """At init the logits are small (N(0, 0.02) weights on a normed 64-wide hidden state: std
    about 0.16), so the step-1 loss is ln 259 plus about var/2. Each padding row's logit is 0
    (zero row): were the padding in the softmax, it would add 125 terms of e^0 at TP1,
    ln(259 + 125) = 5.95, and 253 at TP2."""
    first = losses["one_process"][0][0]
    assert abs(first - math.log(259)) < 0.05, first
    assert abs(first - math.log(384)) > 0.3 and abs(first - math.log(512)) > 0.6


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "one_process"])
def test_layout_matches_one_process(losses, layout):
    (want, want_eval), (got, got_eval) = losses["one_process"], losses[layout]
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= TOL, f"{layout} step {step}: loss {a} vs one process {b}"
    assert len(got_eval) == len(want_eval) == 1
    assert abs(got_eval[0] - want_eval[0]) <= TOL, (layout, got_eval, want_eval)
    assert want[-1] < want[0] - 0.3  # it trained
