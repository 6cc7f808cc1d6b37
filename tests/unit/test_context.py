"""Zigzag sharding, positions and the CP loss mean, in one process."""

from types import SimpleNamespace

import pytest
import torch

from parallel.context import (
    cp_loss_mean,
    default_cp_group,
    zigzag_merge,
    zigzag_positions,
    zigzag_split,
)


def test_split_known_layout():
    x = torch.arange(8)
    assert zigzag_split(x, 2, 0, dim=0).tolist() == [0, 1, 6, 7]
    assert zigzag_split(x, 2, 1, dim=0).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_merge_inverts_split(cp, dim):
    x = torch.randn(2 * cp * 3, 2 * cp * 2, 2 * cp)
    shards = [zigzag_split(x, cp, r, dim=dim) for r in range(cp)]
    assert all(s.shape[dim] == x.shape[dim] // cp for s in shards)
    assert torch.equal(zigzag_merge(shards, dim=dim), x)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_positions_cover_sequence_once(cp):
    seq = 2 * cp * 3
    positions = [zigzag_positions(seq, cp, r) for r in range(cp)]
    for r, pos in enumerate(positions):
        assert pos.dtype == torch.int64
        assert torch.equal(pos, zigzag_split(torch.arange(seq), cp, r, dim=0))
    assert sorted(torch.cat(positions).tolist()) == list(range(seq))


@pytest.fixture
def megatron_rope_on_cpu(monkeypatch):
    """megatron 0.16.1 pins the chunk index and moves it to CUDA; run the same math on CPU."""
    from megatron.core.models.common.embeddings import rope_utils

    real_tensor = torch.tensor

    def unpinned(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", unpinned)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    return rope_utils.get_pos_emb_on_this_cp_rank


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_positions_match_megatron_rope(megatron_rope_on_cpu, cp):
    seq = 2 * cp * 4
    pos_emb = torch.arange(seq, dtype=torch.float32).view(seq, 1, 1, 1)  # [s, 1, 1, dim]
    for r in range(cp):
        group = SimpleNamespace(size=lambda: cp, rank=lambda r=r: r)
        theirs = megatron_rope_on_cpu(pos_emb, seq_dim=0, cp_group=group)
        assert theirs.flatten().long().tolist() == zigzag_positions(seq, cp, r).tolist()


def test_indivisible_length_names_both_numbers():
    with pytest.raises(ValueError, match=r"10 is not divisible by 2\*cp_size = 4 \(cp_size=2\)"):
        zigzag_split(torch.zeros(3, 10), cp_size=2, cp_rank=0, dim=1)
    with pytest.raises(ValueError, match=r"12 is not divisible by 2\*cp_size = 8"):
        zigzag_positions(12, cp_size=4, cp_rank=1)


def test_bad_rank_and_shards_are_named():
    with pytest.raises(ValueError, match=r"cp_rank=2.*cp_size=2"):
        zigzag_split(torch.zeros(8), cp_size=2, cp_rank=2, dim=0)
    with pytest.raises(ValueError, match=r"Shard lengths \[2, 4\]"):
        zigzag_merge([torch.zeros(4), torch.zeros(2)], dim=0)


def test_cp_loss_mean_single_process():
    assert default_cp_group() is None  # no torch.distributed in this process
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True, True]])
    loss = cp_loss_mean(losses, mask)
    torch.testing.assert_close(loss, torch.tensor(8.0 / 3))
    loss.backward()
    torch.testing.assert_close(losses.grad, mask.float() / 3)
    with pytest.raises(ValueError, match="no valid token"):
        cp_loss_mean(losses.detach(), torch.zeros_like(mask))
