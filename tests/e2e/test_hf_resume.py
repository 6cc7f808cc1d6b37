"""A checkpoint of an HF model (here one `convert import` wrote) starts a run without model=hf:
train.resume=CKPT and rl.init_checkpoint=CKPT take the shape from the config.json its origin
records and the tokenizer from the files it keeps (the source folder is gone), and the run
trains exactly as the same run with model=hf."""
import base64
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.hf_tiny import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["train.steps=2", "train.seq_len=32", "train.global_batch_size=4",
          "train.micro_batch_size=2", "logging=none"]


def _run(*args, root, timeout=600):
    # TMPDIR: where a run writes the tokenizer files a checkpoint keeps (config/hf.py)
    os.makedirs(root / "tmp", exist_ok=True)
    env = {**os.environ, "PYTHONPATH": ROOT, "TMPDIR": str(root / "tmp")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if "loss" in r]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(imported checkpoint, the losses of a model=hf run from it, the source's tokenizer
    files); the source folder is removed afterwards."""
    root = tmp_path_factory.mktemp("hf_resume")
    src, ckpt = root / "src", root / "ckpt"
    make_hf_model("qwen2_tied", str(src))
    r = _run("-m", "megatron_ext.convert", "import", "--hf", str(src), "--out", str(ckpt), root=root)
    assert r.returncode == 0, r.stderr[-2000:]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?",
                                        "response": f"the answer is {2 * i}."}) + "\n"
                            for i in range(32)))
    r = _run("-m", "megatron_ext.train", "model=hf", f"model.hf_path={src}",
             f"train.resume={ckpt}", "data=jsonl", f"data.path={data}", *COMMON,
             f"run.dir={root / 'with_hf'}", root=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    files = {n: (src / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    shutil.rmtree(src)
    return root, ckpt, data, _losses(root / "with_hf"), files


def test_resume_of_an_imported_checkpoint_needs_no_model_hf(imported):
    root, ckpt, data, reference, files = imported
    run = root / "without_hf"
    r = _run("-m", "megatron_ext.train", f"train.resume={ckpt}", "data=jsonl", f"data.path={data}",
             *COMMON, "train.save_interval=2", f"run.dir={run}", root=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"initialised from the imported checkpoint {ckpt}" in r.stdout
    losses = _losses(run)
    assert len(losses) == 2 and losses == reference, (losses, reference)
    origin = json.load(open(run / "checkpoints" / "step_00000002" / "train_state.json"))["origin"]
    assert origin["architecture"] == "Qwen2ForCausalLM" and "imported" not in origin
    assert origin["model"]["qkv_bias"] and origin["model"]["tie_embeddings"]
    assert {n: base64.b64decode(origin["tokenizer_files"][n]) for n in files} == files


def test_rl_init_from_an_imported_checkpoint_needs_no_model_hf(imported):
    root, ckpt, _, _, _ = imported
    r = _run("-m", "megatron_ext.train", "stage=rl", f"rl.init_checkpoint={ckpt}",
             "rl.group_size=2", "rl.prompts_per_step=2", "rl.max_new_tokens=4", "train.steps=1",
             "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
             "logging=none", f"run.dir={root / 'rl'}", root=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"policy initialised from {ckpt} (weights only)" in r.stdout


def test_a_lost_tokenizer_is_a_config_error_naming_the_fix(imported):
    root, ckpt, _, _, _ = imported
    bare = root / "bare"
    os.makedirs(bare)
    state = json.load(open(ckpt / "train_state.json"))
    state["origin"]["tokenizer_files"] = {}
    (bare / "train_state.json").write_text(json.dumps(state))
    r = _run("-m", "megatron_ext.train", f"train.resume={bare}", *COMMON,
             f"run.dir={root / 'bare_run'}", root=root)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "config error" in r.stderr and "keeps no tokenizer files" in r.stderr
    assert "add data.tokenizer=DIR" in r.stderr
