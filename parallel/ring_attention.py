"""Ring attention over zigzag-sharded sequences (tensors and groups only; its megatron
core-attention adapter is megatron_ext.models.attention.RingCoreAttention).

Each CP rank holds the zigzag shard of q, k and v (see ``parallel.context``). The KV blocks
travel once around the ring; while the next block is in flight a rank attends its queries to
the block it holds, and the partial results merge exactly through their log-sum-exp (fp32).
Backward walks the ring again: dQ stays local, dK and dV travel with their block and arrive
back at their owner after the last step.

Under the causal mask the zigzag layout makes every non-local step the same size (half of the
query-key pairs of a block pair), so no rank waits for another:
  step 0          my q against my kv, local causal mask;
  source < me     all my q against the source's first chunk (its second chunk is in my future);
  source > me     only my second q chunk against the source's whole kv (my first chunk sees
                  neither of its chunks).
Each step runs as sub-blocks of one kv chunk against one q chunk, so the gradient temporaries of
a call are a quarter of a block's; the block kernel (``parallel.attention_block``: torch's fused
SDPA ops, or the PyTorch reference) returns each sub-block's log-sum-exp for the merge. Per rank
the ring holds the fp32 output, dQ and dK/dV accumulators, and one KV and one dK/dV block in
flight.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from parallel.attention_block import (
    KERNELS,
    attention_block_backward,
    attention_block_forward,
    merge,
)
from parallel.context import default_cp_group, group_size_rank
from parallel.p2p import ring_shift

_KV_TAG, _DKV_TAG = 0, 1  # the two kinds of ring message that can be in flight together
Block = Tuple[slice, slice, bool]


# ---------------------------------------------------------------------------------------------
# The ring.
# ---------------------------------------------------------------------------------------------


def _step_plan(step: int, rank: int, size: int, causal: bool, half: int) -> List[Block]:
    """(query rows, kv rows, causal) of the sub-blocks that interact at ``step``, when the kv of
    rank - step is here. Each sub-block is one kv chunk against at most one q chunk, so its
    gradient temporaries are a quarter of a block's; a causal one is square (its diagonal).
    A ring of one is the block kernel (k and v may then be longer than q)."""
    everything, first, second = slice(None), slice(0, half), slice(half, None)
    if size == 1:
        return [(everything, everything, causal)]
    chunks = [(first, first), (first, second), (second, first), (second, second)]
    if not causal:
        return [(rows, cols, False) for rows, cols in chunks]
    if step == 0:  # my chunks r and 2*size-1-r: the first lies wholly before the second
        return [(first, first, True), (second, first, False), (second, second, True)]
    if step <= rank:  # the source rank is lower: only its first chunk lies in my past
        return [(first, first, False), (second, first, False)]
    return [(second, first, False), (second, second, False)]  # higher: my second chunk only


def _ring_forward(q, k, v, scale, causal, group, kernel):
    size, rank = group_size_rank(group)
    half = q.shape[1] // 2
    kv = torch.stack([k, v])  # one message per step; GQA heads stay unrepeated
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    for step in range(size):
        pending = ring_shift(kv, group, tag=_KV_TAG) if step + 1 < size else None
        for rows, cols, block_causal in _step_plan(step, rank, size, causal, half):
            block_out, block_lse = attention_block_forward(
                q[:, rows], kv[0][:, cols], kv[1][:, cols], scale, block_causal, kernel=kernel
            )
            merge(out[:, rows], lse[:, :, rows], block_out, block_lse)
            del block_out, block_lse  # not alive beside the next sub-block's
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, scale, causal, group, kernel):
    size, rank = group_size_rank(group)
    half = q.shape[1] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    dkv_pending = None
    for step in range(size):
        kv_pending = ring_shift(kv, group, tag=_KV_TAG) if step + 1 < size else None
        # The dK/dV accumulated so far for the block held here arrives from the previous rank;
        # waiting before the block's work frees the one sent during it (memory over overlap).
        if dkv_pending is None:
            dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
        else:
            dkv = dkv_pending.wait()
        for rows, cols, block_causal in _step_plan(step, rank, size, causal, half):
            block_dq, block_dk, block_dv = attention_block_backward(
                dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                out[:, rows], lse[:, :, rows], scale, block_causal, kernel=kernel,
            )
            dq[:, rows] += block_dq
            dkv[0][:, cols] += block_dk
            dkv[1][:, cols] += block_dv
            del block_dq, block_dk, block_dv  # not alive beside the next sub-block's
        if kv_pending is not None:  # first, so the old kv block is gone when dkv's buffer comes
            kv = kv_pending.wait()
        if size > 1:
            dkv_pending = ring_shift(dkv, group, tag=_DKV_TAG)
    if size > 1:  # after the last step the block held is the next rank's: one more hop home
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, group, kernel):
        out, lse = _ring_forward(q, k, v, softmax_scale, causal, group, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal, ctx.group, ctx.kernel = softmax_scale, causal, group, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.group, ctx.kernel
        )
        return dq, dk, dv, None, None, None, None


def _check_inputs(q, k, v, cp_size: int) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"ring_attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
            "expected q [b, s_local, hq, d] and k, v [b, s_local, hkv, d] ([b, s, h, d] layout)."
        )
    (b, s, hq, d), (bk, sk, hkv, dk) = q.shape, k.shape
    if (b, d) != (bk, dk):
        raise ValueError(
            f"ring_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch "
            "and head dim."
        )
    if cp_size > 1 and s != sk:
        raise ValueError(
            f"ring_attention: {s} queries but {sk} keys on this rank with CP size {cp_size}; "
            "q, k and v must be shards of the same sequence (zigzag_split each of them)."
        )
    if hq % hkv != 0:
        raise ValueError(
            f"ring_attention: {hkv} kv heads do not divide {hq} query heads; GQA needs "
            "hq % hkv == 0."
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"ring_attention dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: cast them to one dtype."
        )
    if cp_size > 1 and s % 2 != 0:
        raise ValueError(
            f"ring_attention: local length {s} is odd with CP size {cp_size}; a zigzag shard is "
            f"two equal chunks. Shard with parallel.context.zigzag_split."
        )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    kernel: str = "sdpa",
) -> torch.Tensor:
    """Exact attention over the whole sequence from zigzag shards; returns this rank's shard.

    q [b, s_local, hq, d], k and v [b, s_local, hkv, d] (hkv divides hq). Equal to full
    attention over the unsharded sequence followed by ``zigzag_split``. Without CP (group of
    size 1) k and v may be longer than q, as when decoding with a KV cache; the causal mask is
    then bottom-right aligned (the queries are the last tokens). ``group`` defaults to
    megatron's CP group when parallel_state is initialized, else the world group (or no
    communication at all in a single process without torch.distributed). ``kernel`` is the
    block kernel of ``parallel.attention_block`` ("sdpa": torch's fused ops; "torch": the
    pure-PyTorch reference).
    """
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention kernel={kernel!r} is not one of {', '.join(KERNELS)}; "
                         "pick one of these")
    group = default_cp_group() if group is None else group
    _check_inputs(q, k, v, group_size_rank(group)[0])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _RingAttention.apply(q, k, v, scale, causal, group, kernel)
