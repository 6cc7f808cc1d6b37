"""`python -m megatron_ext.generate` from an HF folder: greedy output equals transformers'
generate(do_sample=False) token for token, and its logprobs equal transformers' log-softmax of
the same logits to 1e-4, at TP1, TP2 and PP2, for plain prompts and chat messages."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.hf_tiny import make_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [{"prompt": "what is 12 + 30?"}, {"prompt": "the answer is"},
           {"messages": [{"role": "user", "content": "hello world, how are you?"}]}]
NEW = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = make_hf_model("qwen3", str(root / "hf"))
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root, model


def _reference(folder, model, record):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    if "messages" in record:
        ids = tok.apply_chat_template(record["messages"], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    else:
        ids = tok(record["prompt"])["input_ids"]
    prompt = torch.tensor([ids])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(prompt, do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                             pad_token_id=eos)
        generated = out[0, prompt.shape[1]:].tolist()
        logp = torch.log_softmax(model(out).logits[0].float(), -1)
    steps = range(prompt.shape[1] - 1, prompt.shape[1] - 1 + len(generated))
    return generated, [logp[j, t].item() for j, t in zip(steps, generated)]


@pytest.mark.parametrize("name, nproc, layout", [("tp1", 1, []), ("tp2", 2, ["parallel.tp=2"]),
                                                ("pp2", 2, ["parallel.pp=2"])])
def test_greedy_generate_equals_transformers(setup, name, nproc, layout):
    root, model = setup
    out = root / f"{name}.jsonl"
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--entry", "generate",
           "--", "model=hf", f"model.hf_path={root / 'hf'}", f"generate.prompts={root / 'prompts.jsonl'}",
           f"generate.out={out}", f"generate.max_new_tokens={NEW}", "generate.max_batch=2",
           "logging=none", *layout]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "generate 3/3 prompts" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(PROMPTS)
    for record, prompt in zip(records, PROMPTS):
        tokens, logprobs = _reference(root / "hf", model, prompt)
        assert record["token_ids"] == tokens, (prompt, record["token_ids"], tokens)
        assert max(abs(a - b) for a, b in zip(record["logprobs"], logprobs)) < 1e-4
        assert record["finish_reason"] in ("eos", "length")


def test_generate_from_a_checkpoint_with_its_recorded_tokenizer(setup, tmp_path):
    """convert import writes a checkpoint; generate.checkpoint takes its shape and tokenizer
    (from the files it recorded once the source folder is gone) and gives the same tokens."""
    import shutil
    root, model = setup
    src = tmp_path / "moved"
    shutil.copytree(root / "hf", src)
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "megatron_ext.convert", "import", "--hf", str(src),
                        "--out", str(tmp_path / "ckpt")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.rmtree(src)
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "megatron_ext.generate",
                        f"generate.checkpoint={tmp_path / 'ckpt'}",
                        f"generate.prompts={root / 'prompts.jsonl'}", f"generate.out={out}",
                        f"generate.max_new_tokens={NEW}", "logging=none"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for record, prompt in zip(records, PROMPTS):
        assert record["token_ids"] == _reference(root / "hf", model, prompt)[0]


def test_sampled_generate_reports_logprobs_at_temperature_1(setup):
    root, model = setup
    out = root / "sampled.jsonl"
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", "2", "--entry", "generate", "--",
           "model=hf", f"model.hf_path={root / 'hf'}", f"generate.prompts={root / 'prompts.jsonl'}",
           f"generate.out={out}", f"generate.max_new_tokens={NEW}", "generate.temperature=0.7",
           "logging=none", "parallel.pp=2"]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(root / "hf"))
    for line, prompt in zip(out.read_text().splitlines(), PROMPTS):
        record = json.loads(line)
        ids = (tok.apply_chat_template(prompt["messages"], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
               if "messages" in prompt else tok(prompt["prompt"])["input_ids"])
        full = torch.tensor([ids + record["token_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0], -1)
        expected = [logp[len(ids) - 1 + j, t].item() for j, t in enumerate(record["token_ids"])]
        assert max(abs(a - b) for a, b in zip(record["logprobs"], expected)) < 1e-4
