"""Fidelity scoring on the built-in task: target-style traces beat misaligned renderings of the same
solutions, feature by feature, and the filter keeps the aligned ones from a mixed set."""
import json
import random

import numpy as np
import pytest

from megatron_ext.align import compare, make_traces, write_split, write_traces
from megatron_ext.align.jsonl import write_jsonl

# At least two operations: a one-operation problem is the same text in "coarse" and "target".
TASK = dict(min_ops=2, max_ops=4)
# Features each misaligned style changes; every other feature must stay (nearly) untouched.
TOUCHED = {
    "verbose": {"n_steps", "tokens_per_step", "total_tokens", "ops_per_step", "word_frac", "repetition", "notation_js"},
    "coarse": {"n_steps", "tokens_per_step", "ops_per_step"},
    "latex": {"tokens_per_step", "total_tokens", "latex_frac", "notation_js"},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    paths = {"reference": str(d / "reference.jsonl")}
    write_traces(paths["reference"], 200, "target", seed=0, **TASK)
    for style in ("target", *TOUCHED):  # the same held-apart problems (seed 1) in every style
        paths[style] = str(d / f"{style}.jsonl")
        write_traces(paths[style], 60, style, seed=1, **TASK)
    return paths


@pytest.fixture(scope="module")
def results(files):
    return {style: compare(files["reference"], files[style]) for style in ("target", *TOUCHED)}


def _mean_feature_scores(result):
    return {name: np.mean([t.feature_scores[name] for t in result.traces]) for name in result.traces[0].feature_scores}


def test_target_style_scores_near_one(results):
    target = results["target"]
    assert target.dataset_score > 0.95
    assert min(t.score for t in target.traces) > 0.8


@pytest.mark.parametrize("style", sorted(TOUCHED))
def test_misaligned_style_scores_lower_on_every_touched_feature(results, style):
    target, other = results["target"], results[style]
    target_means, other_means = _mean_feature_scores(target), _mean_feature_scores(other)
    for name in TOUCHED[style]:
        assert target_means[name] > other_means[name] + 0.1, (style, name, target_means[name], other_means[name])
        div_target, div_other = target.divergences()[name], other.divergences()[name]
        assert div_other["ks"] > div_target["ks"] and div_other["wasserstein"] > div_target["wasserstein"], name
    for name in set(other_means) - TOUCHED[style]:  # the reasons point at the right features
        assert other_means[name] > 0.9, (style, name, other_means[name])
    # Trace by trace (same problem, same order): the target rendering wins and the reasons name touched features.
    for t, o in zip(target.traces, other.traces):
        assert t.score > o.score
        assert o.reasons and all(r.split("=")[0] in TOUCHED[style] for r in o.reasons[:2])
    assert other.dataset_score < 0.2


def test_filter_keeps_aligned_traces_of_a_mixed_set(files, tmp_path):
    records = make_traces(90, "target", seed=2, **TASK)
    records += [r for style in TOUCHED for r in make_traces(30, style, seed=3, **TASK)]
    random.Random(0).shuffle(records)
    mixed = str(tmp_path / "mixed.jsonl")
    write_jsonl(mixed, records)
    result = compare(files["reference"], mixed)
    stats = write_split(mixed, result.traces, 0.5, str(tmp_path / "kept.jsonl"), str(tmp_path / "rejected.jsonl"))
    kept = [json.loads(line) for line in open(stats.kept_path)]
    rejected = [json.loads(line) for line in open(stats.rejected_path)]
    assert stats.kept + stats.rejected == len(records) == len(kept) + len(rejected)
    precision = sum(r["style"] == "target" for r in kept) / len(kept)
    recall = sum(r["style"] == "target" for r in kept) / 90
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    assert all(set(r) == {"prompt", "response", "answer", "style"} for r in kept)  # kept lines are unchanged
    assert all(r["fidelity"]["score"] < 0.5 and r["fidelity"]["reasons"] for r in rejected)


def test_loglik_hook(files, tmp_path):
    calls = []

    def fake_loglik(prompts, responses):  # a "target model" that finds LaTeX unlikely
        assert len(prompts) == len(responses) <= 16
        calls.append(len(prompts))
        return [-1.5 if "$$" in r else -0.2 - 0.01 * (len(p) % 3) for p, r in zip(prompts, responses)]

    mixed = str(tmp_path / "mixed.jsonl")
    write_jsonl(mixed, make_traces(10, "target", seed=4, **TASK) + make_traces(10, "latex", seed=4, **TASK))
    result = compare(files["reference"], mixed, loglik_fn=fake_loglik, batch_size=16)
    assert sum(calls) == 200 + 20 and max(calls) == 16
    scores = [t.feature_scores["loglik"] for t in result.traces]
    assert min(scores[:10]) == 1.0 and max(scores[10:]) < 0.01
    assert any(r.startswith("loglik=-1.5 below") for r in result.traces[10].reasons)
    assert "loglik" in result.to_json()["features"]

    higher = compare(files["reference"], mixed, loglik_fn=lambda p, r: [0.0] * len(r))  # likelier is never worse
    assert all(t.feature_scores["loglik"] == 1.0 for t in higher.traces)

    with pytest.raises(ValueError, match="returned 1 values for 16 traces"):
        compare(files["reference"], mixed, loglik_fn=lambda p, r: [0.0], batch_size=16)
    with pytest.raises(ValueError, match="non-finite"):
        compare(files["reference"], mixed, loglik_fn=lambda p, r: [float("nan")] * len(r))


def test_empty_sets_are_refused(files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="reference set has no valid traces"):
        compare(str(empty), files["target"])
    with pytest.raises(ValueError, match="empty.jsonl has no valid traces"):
        compare(files["reference"], str(empty))
