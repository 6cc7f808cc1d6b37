"""The SFT data gate: each action, and `fail` stopping the run before any training step. (Its
settings are checked by config.validate: tests/unit/test_config.py.)"""
import json
import os

import pytest

from megatron_ext.align import make_traces, write_traces
from megatron_ext.align.gate import FidelityGateError, run_fidelity_gate
from megatron_ext.align.jsonl import write_jsonl
from megatron_ext.config.schema import FidelityGateConfig

TASK = dict(min_ops=2, max_ops=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    paths = {"reference": str(d / "reference.jsonl"), "aligned": str(d / "aligned.jsonl"),
             "verbose": str(d / "verbose.jsonl"), "mixed": str(d / "mixed.jsonl")}
    write_traces(paths["reference"], 100, "target", seed=0, **TASK)
    write_traces(paths["aligned"], 30, "target", seed=1, **TASK)
    write_traces(paths["verbose"], 30, "verbose", seed=1, **TASK)
    write_jsonl(paths["mixed"], make_traces(20, "target", seed=2, **TASK) + make_traces(10, "coarse", seed=2, **TASK))
    return paths


def _cfg(data, **kw):
    return FidelityGateConfig(**{"enabled": True, "reference": data["reference"], **kw})


def test_disabled_gate_passes_the_data_through(data, tmp_path):
    result = run_fidelity_gate(FidelityGateConfig(), data["verbose"], str(tmp_path / "gate"))
    assert result.passed and result.train_path == data["verbose"] and result.dataset_score is None
    assert not os.path.exists(tmp_path / "gate")


def test_fail_raises_before_any_training_step(data, tmp_path):
    steps = []

    def train(candidate):  # the order the trainer follows: gate first, then steps
        result = run_fidelity_gate(_cfg(data, action="fail", min_dataset_score=0.8), candidate, str(tmp_path),
                                   log=lambda msg: None)
        for step in range(3):
            steps.append(step)
        return result

    with pytest.raises(FidelityGateError) as err:
        train(data["verbose"])
    assert steps == []
    msg = str(err.value)
    assert "dataset score 0.0" in msg and "data.fidelity_gate.min_dataset_score=0.8" in msg and "fix:" in msg
    assert (tmp_path / "report.md").exists()  # the report explains the failure

    result = train(data["aligned"])
    assert result.passed and result.train_path == data["aligned"] and result.dataset_score > 0.9
    assert steps == [0, 1, 2]


def test_fail_on_trace_threshold(data, tmp_path):
    with pytest.raises(FidelityGateError, match=r"10 of 30 traces score below data.fidelity_gate.min_trace_score=0.5"):
        run_fidelity_gate(_cfg(data, action="fail", min_trace_score=0.5), data["mixed"], str(tmp_path), log=lambda m: None)


def test_warn_logs_and_continues(data, tmp_path):
    logs = []
    result = run_fidelity_gate(_cfg(data, action="warn", min_dataset_score=0.8), data["verbose"], str(tmp_path),
                               log=logs.append)
    assert not result.passed and result.train_path == data["verbose"] and result.problems
    assert logs[0].startswith("fidelity gate: dataset score 0.000 (min 0.8)")
    assert any(m.startswith("fidelity gate WARNING: dataset score") for m in logs)


def test_filter_returns_the_kept_traces(data, tmp_path):
    logs = []
    result = run_fidelity_gate(_cfg(data, action="filter", min_trace_score=0.5, min_dataset_score=0.9),
                               data["mixed"], str(tmp_path), log=logs.append)
    assert result.passed and result.train_path == str(tmp_path / "kept.jsonl") and result.n_below == 10
    kept = [json.loads(line) for line in open(result.train_path)]
    rejected = [json.loads(line) for line in open(tmp_path / "rejected.jsonl")]
    assert [r["style"] for r in kept] == ["target"] * 20 and [r["style"] for r in rejected] == ["coarse"] * 10
    assert any("filter kept 20/30" in m for m in logs)

    with pytest.raises(FidelityGateError, match=r"after filtering, the 30 traces left score 0.6\d+, below "
                                                r"data.fidelity_gate.min_dataset_score=0.9"):
        run_fidelity_gate(_cfg(data, action="filter", min_trace_score=0.0, min_dataset_score=0.9),
                          data["mixed"], str(tmp_path / "m"), log=lambda m: None)
    with pytest.raises(FidelityGateError, match="none of the 30 traces scores at least data.fidelity_gate.min_trace_score=0.5"):
        run_fidelity_gate(_cfg(data, action="filter", min_trace_score=0.5), data["verbose"], str(tmp_path / "v"),
                          log=lambda m: None)
