"""Every parallel layout trains exactly like one process from the same initial weights."""
import os

import pytest
import torch

from tests.dist._spawn import run_distributed
from tests.dist.parity_worker import STEPS, run_layouts

TOL = 1e-5
SDPA = ["model.attention_backend=sdpa"]  # every other layout and the reference run `local`
TWO = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "dp2": [],
    "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "cp2": ["parallel.cp=2"],
    "tp2_sdpa": ["parallel.tp=2", *SDPA],
    "pp2_sdpa": ["parallel.pp=2", *SDPA],
    "cp2_sdpa": ["parallel.cp=2", *SDPA],
}
FOUR = {
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
    "pp2_vpp2_dp2_distopt": ["parallel.pp=2", "parallel.vpp=2",
                             "parallel.use_distributed_optimizer=true"],
    "cp4": ["parallel.cp=4"],
    "tp2_cp2": ["parallel.tp=2", "parallel.cp=2"],
    "pp2_cp2": ["parallel.pp=2", "parallel.cp=2"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parity"))
    run_distributed(run_layouts, 1, out, {"ref": []})
    run_distributed(run_layouts, 2, out, TWO)
    run_distributed(run_layouts, 4, out, FOUR)
    return {name: torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)
            for name in ["ref", *TWO, *FOUR]}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("layout", [*TWO, *FOUR])
def test_layout_matches_single_process(results, layout):
    ref, got = results["ref"], results[layout]
    assert len(got["loss"]) == STEPS
    for step in range(STEPS):
        assert abs(got["loss"][step] - ref["loss"][step]) <= TOL, (layout, step)
        if got["grads"][step] is not None:
            assert _max_diff(got["grads"][step], ref["grads"][step]) <= TOL, (layout, step)
        assert _max_diff(got["weights"][step], ref["weights"][step]) <= TOL, (layout, step)
    # the run really trained: the weights moved and the loss changed
    assert _max_diff(ref["weights"][-1], ref["weights"][0]) > 1e-3
    assert ref["loss"][-1] != ref["loss"][0]
