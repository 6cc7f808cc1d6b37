"""Ring attention on gloo: equal to full attention over the whole sequence, then zigzag-split.

One launch per CP size; each launch runs every check (a launch costs seconds here).
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from parallel.context import cp_loss_mean, zigzag_positions, zigzag_split
from megatron_ext.models.attention import RingCoreAttention
from parallel.ring_attention import ring_attention

from ._spawn import run_distributed

CHUNK = 5  # tokens per zigzag chunk: odd, so no power-of-two luck hides an indexing bug

# (causal, batch, q heads, kv heads, head dim, dtype)
CASES = [
    (True, 2, 4, 4, 24, torch.float32),
    (False, 2, 4, 4, 24, torch.float32),
    (True, 1, 6, 2, 40, torch.float32),  # GQA
    (False, 1, 6, 2, 40, torch.float32),
    (True, 2, 4, 2, 32, torch.bfloat16),
]
TOLERANCE = {  # (out atol, grad atol); rtol matches
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 5e-2),
}


def reference_attention(q, k, v, causal, scale):
    """Naive attention over the whole sequence, [b, s, h, d], GQA by repeating kv heads."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        s = q.shape[1]
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def _full_problem(seed, seq, case):
    causal, b, hq, hkv, d, dtype = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (
        torch.randn(shape, generator=gen).to(dtype).double()
        for shape in ((b, seq, hq, d), (b, seq, hkv, d), (b, seq, hkv, d), (b, seq, hq, d))
    )
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, causal, d**-0.5)
    out.backward(dout)
    return (q, k, v, dout), (out, q.grad, k.grad, v.grad)


def _check_ring(case, seed, group, label):
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    causal, dtype = case[0], case[5]
    inputs, expected = _full_problem(seed, 2 * cp * CHUNK, case)
    q, k, v, dout = (zigzag_split(t.detach(), cp, rank, dim=1).to(dtype) for t in inputs)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=causal, group=group)
    out.backward(dout)
    atol_out, atol_grad = TOLERANCE[dtype]
    for name, got, want, atol in zip(
        ("out", "dq", "dk", "dv"),
        (out, q.grad, k.grad, v.grad),
        expected,
        (atol_out, atol_grad, atol_grad, atol_grad),
    ):
        assert got.dtype == dtype, f"{label} {name}: dtype {got.dtype}, want {dtype}"
        torch.testing.assert_close(
            got.double(), zigzag_split(want, cp, rank, dim=1), atol=atol, rtol=atol,
            msg=lambda m: f"{label} {name} (cp={cp}, rank={rank}): {m}",
        )


def _check_default_group(rank, world_size):
    """Without megatron parallel_state the default group is the world."""
    case = CASES[2]
    inputs, (want, *_) = _full_problem(7, 2 * world_size * CHUNK, case)
    q, k, v = (zigzag_split(t.detach().float(), world_size, rank, dim=1) for t in inputs[:3])
    got = ring_attention(q, k, v, causal=True)
    want = zigzag_split(want, world_size, rank, dim=1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _check_cp_loss(rank, world_size):
    gen = torch.Generator().manual_seed(3)
    seq = 2 * world_size * CHUNK
    losses = torch.rand(2, seq, generator=gen)
    mask = torch.rand(2, seq, generator=gen) > 0.4
    mask[:, : 2 * CHUNK] = False  # rank 0's first chunk fully masked: counts differ per rank
    local = zigzag_split(losses, world_size, rank, dim=1).requires_grad_()
    local_mask = zigzag_split(mask, world_size, rank, dim=1)
    loss = cp_loss_mean(local, local_mask, group=dist.group.WORLD)
    count = mask.sum()
    torch.testing.assert_close(loss, losses[mask].sum() / count)
    loss.backward()
    torch.testing.assert_close(local.grad, local_mask.float() / count)


def _check_megatron_batch_split(rank, world_size):
    """megatron's get_batch_on_this_cp_rank uses the same layout (group always passed)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = 2 * world_size * CHUNK
    tokens = torch.arange(3 * seq).view(3, seq)
    batch = get_batch_on_this_cp_rank({"tokens": tokens.clone()}, cp_group=dist.group.WORLD)
    assert torch.equal(batch["tokens"], zigzag_split(tokens, world_size, rank, dim=1))
    assert torch.equal(batch["tokens"][0], zigzag_positions(seq, world_size, rank))


def _check_adapter(rank, world_size):
    """The megatron core-attention adapter at CP > 1, called directly with [s, b, h, d] tensors."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    case = CASES[2]
    _, b, hq, hkv, d, _ = case
    config = TransformerConfig(
        num_layers=1, hidden_size=hq * d, num_attention_heads=hq, num_query_groups=hkv,
        attention_dropout=0.0, hidden_dropout=0.0,
    )
    attn = RingCoreAttention(
        config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
        attention_type="self", pg_collection=SimpleNamespace(cp=dist.group.WORLD),
    )
    inputs, (want, *_) = _full_problem(11, 2 * world_size * CHUNK, case)
    q, k, v = (
        zigzag_split(t.detach().float(), world_size, rank, dim=1).transpose(0, 1)
        for t in inputs[:3]
    )
    got = attn(q, k, v, None)
    want = zigzag_split(want, world_size, rank, dim=1).transpose(0, 1).reshape(got.shape)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _all_checks(rank, world_size):
    world = dist.group.WORLD
    for i, case in enumerate(CASES):
        _check_ring(case, seed=i, group=world, label=f"case {case}")
    if world_size == 4:
        # A CP group that is not the world, with non-adjacent global ranks (as with DP x CP).
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        _check_ring(CASES[0], seed=100 + rank % 2, group=groups[rank % 2], label="subgroup")
    _check_default_group(rank, world_size)
    _check_cp_loss(rank, world_size)
    if world_size == 2:  # importing megatron costs seconds per process: once is enough
        _check_megatron_batch_split(rank, world_size)
        _check_adapter(rank, world_size)


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_matches_full_attention(cp):
    run_distributed(_all_checks, cp)
