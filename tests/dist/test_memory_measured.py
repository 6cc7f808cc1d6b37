"""The memory planner against real CPU training steps on two gloo processes.

Static bytes (parameters, fp32 grad buffers, Adam state) must match the live tensors exactly,
with and without the distributed optimizer at DP2; the activation peak of forward+backward
(live CPU tensor bytes, from the allocator events torch's profiler records) must be within
15% of the prediction for at least six rank types. One launch runs every layout.
"""
import glob
import json

import pytest

from megatron_ext.memory.compare import compare
from megatron_ext.memory.measure import measure_layouts
from tests.dist._spawn import run_distributed

# The planner is validated on megatron's own loss, activation and local attention; the fused
# kernels' terms are modelled but not yet measured against it (see docs/results_memory.md).
BASE = ["logging=none", "model=tiny", "data.num_samples=600", "train.steps=1",
        "train.warmup_steps=0", "train.micro_batch_size=2", "model.fused_loss=false",
        "model.fused_swiglu=false", "model.attention_backend=local"]
LAYOUTS = {  # world size 2
    "dp2 s256": ["train.seq_len=256", "train.global_batch_size=4"],
    "dp2 s256 selective dist-opt": ["train.seq_len=256", "train.global_batch_size=4",
                                    "train.recompute=selective",
                                    "parallel.use_distributed_optimizer=true"],
    "dp2 s256 full": ["train.seq_len=256", "train.global_batch_size=4",
                      "train.recompute=full"],
    "dp2 s64": ["train.seq_len=64", "train.global_batch_size=4"],
    "tp2 s256": ["train.seq_len=256", "train.global_batch_size=2", "parallel.tp=2"],
    "pp2 s128 M4": ["train.seq_len=128", "train.global_batch_size=8", "parallel.pp=2"],
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("memory"))
    keys = {f"l{i}": name for i, name in enumerate(LAYOUTS)}
    run_distributed(measure_layouts, 2, out,
                    {key: BASE + LAYOUTS[name] for key, name in keys.items()}, timeout_s=300)
    result = {}
    for key, name in keys.items():
        records = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{key}.rank*.json"))]
        assert len(records) == 2, name
        result[name] = compare(BASE + LAYOUTS[name], 2, records)
    return result


def test_static_bytes_are_exact(rows):
    for name, layout_rows in rows.items():
        for row in layout_rows:
            assert row["static_exact"], (name, row["static_mismatch"])


def test_activation_peak_within_15_percent(rows):
    ratios = {f"{name} [{row['kind']}]": row["ratio"]
              for name, layout_rows in rows.items() for row in layout_rows}
    within = [k for k, r in ratios.items() if abs(r - 1) <= 0.15]
    assert len(ratios) >= 7
    assert len(within) >= 6, ratios
    assert all(abs(r - 1) <= 0.25 for r in ratios.values()), ratios
