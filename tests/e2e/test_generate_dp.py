"""`launch local --entry generate` under DP > 1: each DP replica answers its own contiguous
half of the prompts (its progress line says which), and global rank 0 writes generate.out once,
in the input order: byte for byte the file one process writes at DP2 (each replica runs the
very batches one process runs), the same tokens and log-probs to 1e-5 at TP2 x DP2 (greedy, a
tiny random Qwen3 folder)."""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.hf_tiny import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [{"prompt": "what is 12 + 30?"}, {"prompt": "the answer is"},
           {"messages": [{"role": "user", "content": "hello world, how are you?"}]},
           {"prompt": "one two three"}, {"prompt": "abc"}, {"prompt": "2 + 2 ="},
           {"messages": [{"role": "user", "content": "name a colour"}]}, {"prompt": "zz"}]
PROGRESS = re.compile(r"generate (\d+)/(\d+) prompts on DP rank (\d) of 2 \(records (\d)-(\d) of 8\)")


def _generate(root, name, nproc, *layout):
    out = root / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--entry", "generate",
           "--", "model=hf", f"model.hf_path={root / 'hf'}", f"generate.prompts={root / 'p.jsonl'}",
           f"generate.out={out}", "generate.max_new_tokens=8", "generate.max_batch=2",
           "logging=none", *layout]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out, r.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_dp")
    make_hf_model("qwen3", str(root / "hf"))
    (root / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


@pytest.fixture(scope="module")
def one_process(root):
    out, stdout = _generate(root, "dp1", 1)
    assert "generate 8/8 prompts |" in stdout
    return out


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name, nproc, layout", [("dp2", 2, []), ("tp2_dp2", 4, ["parallel.tp=2"])])
def test_dp_replicas_split_the_prompts_and_rank0_writes_them_in_order(root, one_process, name,
                                                                      nproc, layout):
    out, stdout = _generate(root, name, nproc, *layout)
    final = {}  # DP rank -> its last progress line's (done, share, first, last)
    for m in PROGRESS.finditer(stdout):
        done, share, dp_rank, first, last = map(int, m.groups())
        final[dp_rank] = (done, share, first, last)
    # contiguous halves (2 batches of 2 each), each generated once and in full
    assert final == {0: (4, 4, 1, 4), 1: (4, 4, 5, 8)}, stdout
    assert stdout.count(f"wrote 8 records to {out}") == 1
    if not layout:
        assert out.read_bytes() == one_process.read_bytes()
    got, ref = _records(out), _records(one_process)
    assert [r["prompt"] for r in got] == [p.get("prompt", p.get("messages")) for p in PROMPTS]
    for a, b in zip(got, ref):
        assert (a["token_ids"], a["response"], a["finish_reason"]) == (
            b["token_ids"], b["response"], b["finish_reason"])
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-5
