"""Trajectory buffer: reuse counts, staleness, deterministic shuffling, checkpointing."""

from collections import Counter

import pytest
import torch

from megatron_ext.rl.buffer import TrajectoryBuffer


def _rows(start, n, length=3):
    ids = torch.arange(start, start + n)
    return {"id": ids, "tokens": ids[:, None].repeat(1, length),
            "old_logp": -torch.rand(n, length)}


def test_each_row_serves_every_epoch_once_per_epoch():
    buf = TrajectoryBuffer(epochs=3, mini_batches=4, seed=1)
    buf.add(_rows(0, 8), version=5)
    batches = list(buf.minibatches(version=5))
    assert len(batches) == 12 and all(len(b["id"]) == 2 for b in batches)
    uses = Counter(i for b in batches for i in b["id"].tolist())
    assert uses == {i: 3 for i in range(8)}
    for epoch in range(3):  # every epoch is a permutation of all rows
        ids = torch.cat([b["id"] for b in batches[4 * epoch:4 * epoch + 4]])
        assert sorted(ids.tolist()) == list(range(8))
    assert torch.equal(batches[0]["version"], torch.tensor([5, 5]))
    assert buf.stats == {"updates": 12, "row_uses": 24, "dropped_stale": 0}
    assert len(buf) == 0  # consumed


def test_staleness_drops_rows_older_than_the_limit():
    buf = TrajectoryBuffer(epochs=2, mini_batches=2, max_staleness=2, seed=0)
    buf.add(_rows(0, 4), version=9)  # one version behind: staleness 1, 2, 3, 4 at updates 0..3
    buf.add(_rows(4, 4), version=10)  # staleness 0, 1, 2, 3
    seen = []
    for k, batch in enumerate(buf.minibatches(version=10)):
        policy = 10 + k
        assert (policy - batch["version"] <= 2).all()
        seen.append(batch["id"].tolist())
    uses = Counter(i for ids in seen for i in ids)
    # old rows survive updates 0 and 1 (one epoch); new rows updates 0, 1 and 2
    assert all(uses[i] == 1 for i in range(4))
    assert buf.stats["dropped_stale"] == 8
    assert buf.stats["updates"] == len(seen) == 3
    assert sum(uses.values()) == buf.stats["row_uses"]


def test_shuffle_is_deterministic_and_differs_between_iterations():
    def order(seed, iterations):
        buf = TrajectoryBuffer(epochs=2, mini_batches=2, seed=seed)
        out = []
        for _ in range(iterations):
            buf.add(_rows(0, 6), version=0)
            out.append([b["id"].tolist() for b in buf.minibatches(0)])
        return out
    assert order(3, 2) == order(3, 2)
    assert order(3, 2) != order(4, 2)
    first, second = order(3, 2)
    assert first != second


def test_state_dict_resumes_the_same_order():
    buf = TrajectoryBuffer(epochs=2, mini_batches=2, max_staleness=5, seed=7)
    buf.add(_rows(0, 4), version=0)
    list(buf.minibatches(0))
    buf.add(_rows(10, 4), version=4)
    state = buf.state_dict()
    want = [b["id"].tolist() for b in buf.minibatches(4)]
    other = TrajectoryBuffer()
    other.load_state_dict(state)
    assert [b["id"].tolist() for b in other.minibatches(4)] == want


def test_different_lengths_are_right_padded_and_bad_batches_rejected():
    buf = TrajectoryBuffer(mini_batches=2)
    buf.add(_rows(0, 2, length=3), version=0)
    buf.add(_rows(2, 2, length=5), version=0)
    (batch,) = [b for b in buf.minibatches(0) if 1 in b["id"].tolist()]
    assert batch["tokens"].shape[1] == 5
    row = batch["tokens"][batch["id"].tolist().index(1)]
    assert row.tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="no 'old_logp'"):
        buf.add({"id": torch.arange(2)}, version=0)
    with pytest.raises(ValueError, match="row count"):
        buf.add({"old_logp": torch.zeros(2, 3), "id": torch.arange(3)}, version=0)
    buf.add(_rows(0, 3), version=0)
    with pytest.raises(ValueError, match="3 rows, not divisible by mini_batches=2"):
        buf.minibatches(0)
