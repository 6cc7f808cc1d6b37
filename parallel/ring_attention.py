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

Packed documents (``document_ids``, the whole row's, known on every rank before the zigzag
split): a query sees the keys of its own document only. Documents are contiguous runs, so each
query's visible keys in a chunk are one range, computed locally for every sub-block (no extra
communication): a sub-block that no query reaches is skipped, one where every query sees what
the plain pattern shows runs as before, and the others run with per-query key bounds (rows
that see nothing there get log-sum-exp -inf, merged exactly).
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from parallel.attention_block import (
    KERNELS,
    Bounds,
    attention_block_backward,
    attention_block_forward,
    merge,
)
from parallel.context import default_cp_group, group_size_rank, zigzag_positions
from parallel.p2p import ring_shift

_KV_TAG, _DKV_TAG = 0, 1  # the two kinds of ring message that can be in flight together
Block = Tuple[slice, slice, bool]
Task = Tuple[slice, slice, bool, Optional[Bounds]]  # a sub-block, with its key bounds if masked


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


def _document_extent(document_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[b, s] document ids (contiguous runs) -> each token's document's first and last
    position, [b, s] int64."""
    s = document_ids.shape[1]
    index = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    change = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = change
    ends = torch.ones_like(starts)
    ends[:, :-1] = change
    first = torch.where(starts, index, 0).cummax(dim=1).values
    last = torch.where(ends, index, s).flip(1).cummin(dim=1).values.flip(1)
    return first, last


def _plan(size: int, rank: int, causal: bool, half: int, sq: int,
          document_ids: Optional[torch.Tensor]) -> List[List[Task]]:
    """Per ring step, the sub-blocks to run: ``_step_plan``'s, and with packed documents each
    one's key bounds, the sub-blocks no query reaches left out. One host sync for the call."""
    steps = [[(rows, cols, c, None) for rows, cols, c in _step_plan(t, rank, size, causal, half)]
             for t in range(size)]
    if document_ids is None:
        return steps
    first, last = _document_extent(document_ids)
    s = document_ids.shape[1]
    if size == 1:
        q_pos = torch.arange(s - sq, s, device=first.device)
    else:
        q_pos = zigzag_positions(s, size, rank).to(first.device)
    lo = first[:, q_pos]
    hi = q_pos.expand_as(lo) if causal else last[:, q_pos]
    tasks, flags = [], []
    for t, step in enumerate(steps):
        source = (rank - t) % size
        for rows, cols, block_causal, _ in step:
            chunk = source if cols.start == 0 else 2 * size - 1 - source  # the kv chunk's index
            start, n_keys = (0, s) if size == 1 else (chunk * half, half)
            first_key = (lo[:, rows] - start).clamp_min(0)
            last_key = (hi[:, rows] - start).clamp_max(n_keys - 1)
            flags.append(torch.stack([
                (first_key <= last_key).any(),  # some query sees a key here
                (first_key == 0).all() & (block_causal or (last_key == n_keys - 1).all()),
            ]))
            tasks.append((t, rows, cols, block_causal, (first_key, last_key)))
    plan: List[List[Task]] = [[] for _ in range(size)]
    for (t, rows, cols, block_causal, bounds), (reached, plain) in zip(
            tasks, torch.stack(flags).tolist()):
        if reached:
            plan[t].append((rows, cols, block_causal, None) if plain
                           else (rows, cols, False, bounds))
    return plan


def _ring_forward(q, k, v, scale, group, kernel, plan: Sequence[List[Task]]):
    size, rank = group_size_rank(group)
    kv = torch.stack([k, v])  # one message per step; GQA heads stay unrepeated
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
    for step in range(size):
        pending = ring_shift(kv, group, tag=_KV_TAG) if step + 1 < size else None
        for rows, cols, block_causal, bounds in plan[step]:
            block_out, block_lse = attention_block_forward(
                q[:, rows], kv[0][:, cols], kv[1][:, cols], scale, block_causal, kernel=kernel,
                bounds=bounds,
            )
            merge(out[:, rows], lse[:, :, rows], block_out, block_lse)
            del block_out, block_lse  # not alive beside the next sub-block's
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, scale, group, kernel, plan: Sequence[List[Task]]):
    size, rank = group_size_rank(group)
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
        for rows, cols, block_causal, bounds in plan[step]:
            block_dq, block_dk, block_dv = attention_block_backward(
                dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
                out[:, rows], lse[:, :, rows], scale, block_causal, kernel=kernel, bounds=bounds,
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
    def forward(ctx, q, k, v, softmax_scale, causal, group, kernel, document_ids):
        size, rank = group_size_rank(group)
        plan = _plan(size, rank, causal, q.shape[1] // 2, q.shape[1], document_ids)
        out, lse = _ring_forward(q, k, v, softmax_scale, group, kernel, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.group, ctx.kernel, ctx.plan = softmax_scale, group, kernel, plan
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout, q, k, v, out, lse, ctx.softmax_scale, ctx.group, ctx.kernel, ctx.plan
        )
        return dq, dk, dv, None, None, None, None, None


def _check_documents(document_ids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cp_size: int) -> None:
    b, s = q.shape[:2]
    want = (b, s * cp_size if cp_size > 1 else k.shape[1])
    if document_ids.dim() != 2 or tuple(document_ids.shape) != want:
        raise ValueError(
            f"ring_attention document_ids of shape {tuple(document_ids.shape)}: expected {want}, "
            "the document id of every token of the whole (unsharded) sequence, the same on "
            "every CP rank; pass the batch's document_ids before zigzag_split.")
    if document_ids.is_floating_point() or (document_ids[:, 1:] < document_ids[:, :-1]).any():
        raise ValueError(
            "ring_attention document_ids must be integers that never decrease along a row "
            "(each document one contiguous run, as data.packing numbers them); renumber them.")


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
    document_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact attention over the whole sequence from zigzag shards; returns this rank's shard.

    q [b, s_local, hq, d], k and v [b, s_local, hkv, d] (hkv divides hq). Equal to full
    attention over the unsharded sequence followed by ``zigzag_split``. Without CP (group of
    size 1) k and v may be longer than q, as when decoding with a KV cache; the causal mask is
    then bottom-right aligned (the queries are the last tokens). ``group`` defaults to
    megatron's CP group when parallel_state is initialized, else the world group (or no
    communication at all in a single process without torch.distributed). ``kernel`` is the
    block kernel of ``parallel.attention_block`` ("sdpa": torch's fused ops; "torch": the
    pure-PyTorch reference). ``document_ids`` [b, s] (the whole sequence's, not a shard)
    restricts each query to the keys of its own document (packed documents).
    """
    if kernel not in KERNELS:
        raise ValueError(f"ring_attention kernel={kernel!r} is not one of {', '.join(KERNELS)}; "
                         "pick one of these")
    group = default_cp_group() if group is None else group
    cp_size = group_size_rank(group)[0]
    _check_inputs(q, k, v, cp_size)
    if document_ids is not None:
        _check_documents(document_ids, q, k, cp_size)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _RingAttention.apply(q, k, v, scale, causal, group, kernel, document_ids)
