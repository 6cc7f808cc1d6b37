"""The HF workflow from the command line: import then export gives the same tensors, tokenizer
files and logits; SFT at TP2xPP2 from an HF folder, export, and transformers' reload computes
our trained model's logits."""
import filecmp
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.hf_tiny import make_hf_model, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _tensors(folder):
    from safetensors.torch import load_file
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


def _reload(folder):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2_tied", "qwen3"])
def test_import_export_round_trip(tmp_path, kind):
    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    original = make_hf_model(kind, str(src))
    r = _run("-m", "megatron_ext.convert", "import", "--hf", str(src), "--out", str(ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run("-m", "megatron_ext.convert", "export", "--checkpoint", str(ckpt), "--out", str(out),
             "--max-shard-gb", "0.00003")
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1  # sharded
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(src / name, out / name, shallow=False), name
    config = json.load(open(out / "config.json"))
    assert config["dtype"] == "float32" and config["architectures"] == original.config.architectures
    assert config["tie_word_embeddings"] == original.config.tie_word_embeddings
    ids = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(_reload(str(out))(ids).logits, original(ids).logits)


def test_sft_tp2pp2_from_hf_then_export(tmp_path):
    src, run, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    make_hf_model("llama_tied", str(src))
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?",
                                        "response": f"the answer is {2 * i}."}) + "\n"
                            for i in range(64)))
    r = _run("-m", "launch", "local", "--nproc", "4", "--", "model=hf", f"model.hf_path={src}",
             "parallel.tp=2", "parallel.pp=2", "data=jsonl", f"data.path={data}",
             "train.steps=3", "train.save_interval=3", "train.seq_len=32",
             "train.global_batch_size=8", "train.micro_batch_size=2", "logging=none",
             f"run.dir={run}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"model initialised from {src}" in r.stdout
    ckpt = run / "checkpoints" / "step_00000003"
    r = _run("-m", "megatron_ext.convert", "export", "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ids = tokens(2, 12, seed=3)
    torch.save(ids, tmp_path / "ids.pt")
    r = _run("tests/e2e/hf_logits.py", str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "ours.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    ours = torch.load(tmp_path / "ours.pt")
    with torch.no_grad():
        theirs = _reload(str(out))(ids).logits
        untrained = _reload(str(src))(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (untrained - theirs).abs().max() > 1e-3  # the 3 steps changed the weights
    assert filecmp.cmp(src / "tokenizer.json", out / "tokenizer.json", shallow=False)


def test_model_from_scratch_exports_as_llama_with_the_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from megatron_ext.data.tokenizer import ByteTokenizer
    run, out = tmp_path / "run", tmp_path / "out"
    r = _run("-m", "megatron_ext.train", "model=tiny", "train.steps=1", "train.save_interval=1",
             "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
             "data.num_samples=64", "logging=none", f"run.dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = run / "checkpoints" / "step_00000001"
    r = _run("-m", "megatron_ext.convert", "export", "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    model = _reload(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    text = "12+30=42 ✓"
    ids = torch.tensor([ByteTokenizer().encode(text)])
    assert AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    torch.save(ids, tmp_path / "ids.pt")
    r = _run("tests/e2e/hf_logits.py", str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "ours.pt"))
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        assert (torch.load(tmp_path / "ours.pt") - model(ids).logits).abs().max() < 1e-4


def test_imported_checkpoint_starts_rl_and_sft_in_another_layout(tmp_path):
    src, ckpt = tmp_path / "src", tmp_path / "ckpt"
    make_hf_model("qwen2_tied", str(src))
    r = _run("-m", "megatron_ext.convert", "import", "--hf", str(src), "--out", str(ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    common = ["model=hf", f"model.hf_path={src}", "parallel.tp=2", "train.steps=1",
              "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
              "logging=none"]
    r = _run("-m", "launch", "local", "--nproc", "2", "--", *common, "stage=rl",
             f"rl.init_checkpoint={ckpt}", "rl.group_size=2", "rl.prompts_per_step=2",
             "rl.max_new_tokens=4", f"run.dir={tmp_path / 'rl'}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"policy initialised from {ckpt} (weights only)" in r.stdout
    r = _run("-m", "launch", "local", "--nproc", "2", "--", *common, f"train.resume={ckpt}",
             "data.num_samples=64", f"run.dir={tmp_path / 'sft'}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"initialised from the imported checkpoint {ckpt}" in r.stdout
    assert "step     1/1" in r.stdout
