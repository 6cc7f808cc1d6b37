"""Blockwise attention kernel, ring_attention at CP=1 and the megatron adapter, one process."""

import math

import pytest
import torch

from megatron_ext.models.attention import RingCoreAttention
from parallel.attention_block import merge
from parallel.ring_attention import (
    _plan,
    attention_block_backward,
    attention_block_forward,
    ring_attention,
)


def naive_attention(q, k, v, scale, causal):
    """(out, lse) with bottom-right causal alignment; kv heads repeated for GQA."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        future = torch.ones(sq, sk, dtype=torch.bool).triu(sk - sq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return out, scores.logsumexp(dim=-1)


def _inputs(b, sq, sk, hq, hkv, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, sq, hq, d))
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b, sq, sk, hq, hkv, d, block",
    [
        (2, 13, 13, 4, 4, 24, 5),  # tiles with ragged edges
        (1, 7, 19, 6, 2, 40, 4),  # GQA, more keys than queries
        (1, 16, 16, 2, 1, 8, 16),  # one tile
    ],
)
def test_block_kernel_matches_naive(causal, b, sq, sk, hq, hkv, d, block):
    q, k, v, dout = _inputs(b, sq, sk, hq, hkv, d)
    scale = 0.7 / math.sqrt(d)
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = naive_attention(ref_q, ref_k, ref_v, scale, causal)
    ref_out.backward(dout)

    out, lse = attention_block_forward(q.float(), k.float(), v.float(), scale, causal, block)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-5, rtol=1e-5)
    grads = attention_block_backward(
        dout.float(), q.float(), k.float(), v.float(), out, lse, scale, causal, block
    )
    for got, want in zip(grads, (ref_q.grad, ref_k.grad, ref_v.grad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_block_kernel_bf16_accumulates_in_fp32():
    q, k, v, _ = _inputs(1, 64, 64, 2, 1, 16, dtype=torch.bfloat16)
    out, lse = attention_block_forward(q, k, v, 0.25, True, 16)
    assert out.dtype == lse.dtype == torch.float32
    ref_out, ref_lse = naive_attention(q.double(), k.double(), v.double(), 0.25, True)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_causal_block_needs_enough_keys():
    q, k, v, _ = _inputs(1, 8, 4, 2, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="8 queries and 4 keys"):
        attention_block_forward(q, k, v, 1.0, True)


@pytest.mark.parametrize("causal", [True, False])
def test_ring_attention_single_process(causal):
    q, k, v, dout = _inputs(2, 12, 12, 4, 2, 24, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=causal)
    out.backward(dout)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = naive_attention(*ref, 24**-0.5, causal)
    ref_out.backward(dout.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-5, rtol=1e-5)
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in ref)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_ring_attention_single_process_kv_cache(causal):
    """Decoding at CP=1: fewer queries than keys, queries are the last tokens."""
    q, k, v, dout = _inputs(1, 3, 10, 4, 2, 16, dtype=torch.float32)
    q.requires_grad_()
    out = ring_attention(q, k, v, causal=causal)
    out.backward(dout)
    ref_q = q.detach().double().requires_grad_()
    ref_out, _ = naive_attention(ref_q, k.double(), v.double(), 0.25, causal)
    ref_out.backward(dout.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), ref_q.grad, atol=1e-4, rtol=1e-4)


def test_ring_attention_rejects_bad_heads():
    q, k, v, _ = _inputs(1, 4, 4, 4, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 kv heads do not divide 4 query heads"):
        ring_attention(q, k, v)


class NaiveCoreAttention(torch.nn.Module):
    """The reference for the adapter, with the same core_attention contract."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **_):
        super().__init__()
        self.scale = config.kv_channels**-0.5

    def forward(self, query, key, value, attention_mask, **_):
        out, _ = naive_attention(
            *(t.transpose(0, 1) for t in (query, key, value)), self.scale, causal=True
        )
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1)


def test_adapter_inside_megatron_self_attention(megatron_single_rank):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=48, num_attention_heads=4, num_query_groups=2,
        attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
    )

    def layer(core_attention):
        torch.manual_seed(0)
        submodules = SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention,
            linear_proj=RowParallelLinear,
        )
        return SelfAttention(config, submodules, layer_number=1, attn_mask_type=AttnMaskType.causal)

    ring_layer, ref_layer = layer(RingCoreAttention), layer(NaiveCoreAttention)
    assert ring_layer.core_attention.cp_group is megatron_single_rank.get_context_parallel_group()
    x = torch.randn(10, 2, 48)  # [s, b, h]
    x_ring, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = ring_layer(x_ring, None)
    ref, _ = ref_layer(x_ref, None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x_ring.grad, x_ref.grad, atol=1e-4, rtol=1e-4)


def test_adapter_rejects_dropout():
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2)
    with pytest.raises(ValueError, match="attention dropout 0.1.*attention_dropout=0.0"):
        RingCoreAttention(config, 1, AttnMaskType.causal, "self")


# ---------------------------------------------------------------------------------------------
# Packed documents: key bounds per query, and the ring's plan of which sub-blocks run how.
# ---------------------------------------------------------------------------------------------


def masked_attention(q, k, v, scale, allowed):
    """(out, lse) of dense attention where `allowed` [b, sq, sk] is True; a row that sees no key
    gets out 0 and lse -inf."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1).nan_to_num(0.0), v)
    return out, scores.logsumexp(dim=-1)


@pytest.mark.parametrize("kernel", ["sdpa", "torch"])
def test_block_kernel_with_key_bounds(kernel):
    b, sq, sk, hq, hkv, d = 2, 9, 11, 4, 2, 8
    q, k, v, dout = _inputs(b, sq, sk, hq, hkv, d)
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, sk, (b, sq), generator=gen)
    last = torch.randint(0, sk, (b, sq), generator=gen)
    first[0, 3], last[0, 3] = 5, 4  # rows that see no key of this block
    first[1, 2] = sk
    keys = torch.arange(sk)
    allowed = (keys >= first[..., None]) & (keys <= last[..., None])
    assert (~allowed.any(-1)).sum() >= 2
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention(ref_q, ref_k, ref_v, 0.3, allowed)
    ref_out.backward(dout)
    out, lse = attention_block_forward(q.float(), k.float(), v.float(), 0.3, False, block=4,
                                       kernel=kernel, bounds=(first, last))
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(lse.isinf(), ref_lse.isinf())  # -inf exactly where nothing is seen
    grads = attention_block_backward(dout.float(), q.float(), k.float(), v.float(), out, lse,
                                     0.3, False, block=4, kernel=kernel, bounds=(first, last))
    for got, want in zip(grads, (ref_q.grad, ref_k.grad, ref_v.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="bounds replace the causal pattern"):
        attention_block_forward(q.float(), k.float(), v.float(), 0.3, True, bounds=(first, last))


def test_merge_keeps_rows_without_keys_finite():
    out, lse = torch.zeros(1, 2, 1, 3), torch.full((1, 1, 2), float("-inf"))
    block_out, block_lse = torch.ones(1, 2, 1, 3), torch.tensor([[[float("-inf"), 0.5]]])
    block_out[0, 0] = 0.0
    merge(out, lse, block_out, block_lse)  # row 0: no key in either, row 1: its first keys
    assert out[0, 0].eq(0).all() and out[0, 1].eq(1).all()
    assert lse[0, 0, 0] == float("-inf") and lse[0, 0, 1] == 0.5


def test_ring_plan_skips_plain_and_masked_sub_blocks():
    """CP2, rank 0 (chunks 0 and 3 of 4, 5 tokens each): documents [0, 3), [3, 17), [17, 20)."""
    docs = torch.tensor([[0] * 3 + [1] * 14 + [2] * 3])
    plan = _plan(2, 0, True, 5, 10, docs)
    # step 0 (own kv): chunk 0 diagonal masked (two documents in it); chunk 3 against chunk 0:
    # queries 15, 16 see keys 3, 4 (masked); chunk 3's diagonal masked
    assert [(r.start, c.start, bounds is None) for r, c, _, bounds in plan[0]] == [
        (0, 0, False), (5, 0, False), (5, 5, False)]
    # step 1 (rank 1's kv, chunks 1 and 2): chunk 3's queries 15, 16 see all of them, 17-19
    # none (rows without keys); chunk 0 (queries 0-4) sees neither: not in the plan
    (rows, cols, causal, (first, last)), (rows2, cols2, _, bounds2) = plan[1]
    assert (rows.start, cols.start, causal) == (5, 0, False)
    assert first[:, :2].tolist() == [[0, 0]] and last.tolist() == [[4] * 5]
    assert (first <= last).tolist() == [[True, True, False, False, False]]
    assert (rows2.start, cols2.start) == (5, 5) and bounds2 is not None
    # one document: the plain plan, no bounds anywhere
    plain = _plan(2, 0, True, 5, 10, torch.zeros(1, 20, dtype=torch.long))
    assert plain == _plan(2, 0, True, 5, 10, None)


def test_ring_attention_single_process_documents():
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3], [0] + [1] * 9 + [2, 2]])
    q, k, v, dout = _inputs(2, 12, 12, 4, 2, 8)
    allowed = (docs[:, :, None] == docs[:, None, :]) & torch.ones(12, 12, dtype=torch.bool).tril()
    want, _ = masked_attention(q, k, v, 0.3, allowed)
    for kernel in ("sdpa", "torch"):
        got = ring_attention(q.float(), k.float(), v.float(), softmax_scale=0.3, kernel=kernel,
                             document_ids=docs)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="never decrease along a row"):
        ring_attention(q.float(), k.float(), v.float(), document_ids=docs.flip(1))
    with pytest.raises(ValueError, match="the whole \\(unsharded\\) sequence"):
        ring_attention(q.float(), k.float(), v.float(), document_ids=docs[:, :6])
