"""HF models imported into TP/PP/VPP shards compute what transformers computes: logits to 1e-4
(same argmax) and the training loss to 1e-5, in fp32, for Llama (tied with llama3 RoPE
scaling, untied with linear scaling), Qwen2 (QKV bias, tied) and Qwen3 (QK-norm, head_dim !=
hidden/heads), vocab 300 padded by megatron."""
import os

import pytest
import torch

from tests.dist._spawn import run_distributed
from tests.dist.hf_worker import BATCH, LAYOUTS, SEQ, run_models
from tests.hf_tiny import KINDS, make_hf_model, tokens


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_parity")
    models, reference = {}, {}
    ids = tokens(BATCH, SEQ + 1)
    for kind in KINDS:
        hf = make_hf_model(kind, str(root / kind))
        models[kind] = str(root / kind)
        with torch.no_grad():
            out = hf(ids[:, :-1])
            loss = hf(ids, labels=ids).loss
        reference[kind] = {"logits": out.logits, "loss": float(loss)}
    run_distributed(run_models, 4, str(root), models, list(LAYOUTS), timeout_s=600)
    return root, reference


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_loss_equal_transformers(results, kind):
    root, reference = results
    ref = reference[kind]
    for layout in LAYOUTS:
        got = torch.load(os.path.join(root, f"{kind}-{layout}.pt"))
        diff = (got["logits"] - ref["logits"]).abs().max().item()
        assert diff < 1e-4, f"{kind} {layout}: logits differ by {diff}"
        assert torch.equal(got["logits"].argmax(-1), ref["logits"].argmax(-1)), (kind, layout)
        assert abs(got["loss"] - ref["loss"]) < 1e-5, (kind, layout, got["loss"], ref["loss"])


def test_sharded_files(results):
    root, _ = results
    assert len([n for n in os.listdir(root / "qwen3") if n.endswith(".safetensors")]) > 1
