"""Difficulty filter band edges, pass-rate history weights and checkpointing, fill_batch."""

import itertools

import pytest
import torch

from megatron_ext.rl import difficulty_filter
from megatron_ext.rl.filtering import PassRateHistory, fill_batch


def test_band_edges_are_inclusive():
    rates = [0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0]
    keep = difficulty_filter(rates, 0.125, 0.875)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, True, True, True, True, False]
    assert difficulty_filter(torch.tensor([0.0, 1.0]), 0.0, 1.0).all()
    assert difficulty_filter([0.5], 0.5, 0.5).tolist() == [True]
    with pytest.raises(ValueError, match=r"band \[0.9, 0.1\]"):
        difficulty_filter(rates, 0.9, 0.1)


def test_history_weights_and_state_roundtrip():
    h = PassRateHistory(0.1, 0.9, alpha=0.5, out_of_band_weight=0.2)
    h.update(["easy", "mid", "hard"], [1.0, 0.5, 0.0])
    assert h.sampling_weights(["easy", "mid", "hard", "new"]).tolist() == [0.2, 1.0, 0.2, 1.0]
    h.update(["easy"], [0.5])  # EMA: 0.5 * 1.0 + 0.5 * 0.5 = 0.75, back in band
    assert h.pass_rate("easy") == pytest.approx(0.75)
    assert h.sampling_weights(["easy"]).tolist() == [1.0]
    clone = PassRateHistory(0.0, 1.0)
    clone.load_state_dict(h.state_dict())
    assert clone.state_dict() == h.state_dict()
    assert clone.sampling_weights(["hard", "mid"]).tolist() == [0.2, 1.0]
    with pytest.raises(ValueError, match="2 prompt ids but 1"):
        h.update([1, 2], [0.5])


def _sampler(rates):
    """A fake rollout: the pass rate of prompt p is rates[p]; the group is ("g", p)."""
    calls = []

    def sample(prompts):
        calls.append(list(prompts))
        return [(("g", p), rates[p]) for p in prompts]
    return sample, calls


def test_fill_batch_refills_until_full():
    rates = {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.25, 4: 1.0, 5: 0.75, 6: 0.5}
    sample, calls = _sampler(rates)
    res = fill_batch(sample, itertools.count(), 3, (0.1, 0.9), max_rounds=5)
    assert calls == [[0, 1, 2], [3, 4], [5]]  # each round asks for what is still missing
    assert res.groups == [("g", 1), ("g", 3), ("g", 5)]
    assert (res.kept, res.dropped_too_easy, res.dropped_too_hard, res.rounds) == (3, 2, 1, 3)
    assert res.message is None
    assert res.observed == [(p, rates[p]) for p in range(6)]


def test_fill_batch_stops_at_its_limit_with_one_log_line():
    sample, calls = _sampler({p: (1.0 if p % 3 else 0.5) for p in range(100)})
    res = fill_batch(sample, itertools.count(), 4, (0.0, 0.9), max_rounds=2)
    assert res.rounds == 2 and len(calls) == 2
    assert res.kept == 2 and len(res.groups) == 2  # prompts 0 and 3 (round 1: 0..3, round 2: 4, 5)
    assert res.dropped_too_easy == 4 and res.dropped_too_hard == 0
    assert "\n" not in res.message
    assert "kept 2/4" in res.message and "2 rounds" in res.message
    assert "rl.max_refill_rounds" in res.message


def test_fill_batch_pool_runs_dry():
    sample, _ = _sampler({0: 0.5, 1: 1.0})
    res = fill_batch(sample, [0, 1], 3, (0.0, 0.9), max_rounds=10)
    assert res.kept == 1 and res.rounds == 1
    assert "pool ran out" in res.message
