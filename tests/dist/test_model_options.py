"""Model options that must not change the math: the fused loss and fused SwiGLU against
megatron's own loss and activation, and each recompute policy against none (one process,
same initial weights, 3 optimizer steps)."""
import os

import pytest
import torch

from tests.dist._spawn import run_distributed
from tests.dist.parity_worker import STEPS, run_layouts

TOL = 1e-5
UNFUSED = ["model.fused_loss=false", "model.fused_swiglu=false"]
LAYOUTS = {
    "unfused": UNFUSED,
    "fused": [],
    "fused_loss_only": ["model.fused_swiglu=false"],
    "selective": ["train.recompute=selective"],
    "full_uniform": ["train.recompute=full", "train.recompute_method=uniform",
                     "train.recompute_num_layers=2"],
    "full_block": ["train.recompute=full", "train.recompute_method=block",
                   "train.recompute_num_layers=1"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("options"))
    run_distributed(run_layouts, 1, out, LAYOUTS)
    return {n: torch.load(os.path.join(out, f"{n}.pt"), weights_only=True) for n in LAYOUTS}


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "unfused"])
def test_option_matches_unfused_model(results, name):
    ref, got = results["unfused"], results[name]
    for step in range(STEPS):
        assert abs(got["loss"][step] - ref["loss"][step]) <= TOL, (name, step)
        for key in ref["grads"][step]:
            diff = (got["grads"][step][key] - ref["grads"][step][key]).abs().max().item()
            assert diff <= TOL, (name, step, key, diff)
    assert ref["loss"][-1] < ref["loss"][0]


def test_fused_paths_are_really_taken(results):
    assert (results["fused"]["model_class"], results["unfused"]["model_class"]) == (
        "FusedLossGPTModel", "VocabGPTModel")
    assert results["fused"]["swiglu_modules"] == 4  # one per layer of the tiny model
    assert results["unfused"]["swiglu_modules"] == results["fused_loss_only"]["swiglu_modules"] == 0
