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
"""

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from parallel.context import default_cp_group, group_size_rank
from parallel.p2p import ring_shift

try:  # Optional GPU kernels; the PyTorch kernel below serves everywhere else.
    import flash_attn
    from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward

    # The positional signatures used below are those of flash-attn >= 2.7.
    _FLASH = tuple(int(p) for p in flash_attn.__version__.split(".")[:2]) >= (2, 7)
except (ImportError, OSError, RuntimeError):
    _FLASH = False

BLOCK = 1024  # query/key chunk of the PyTorch kernel: score tiles stay [BLOCK x BLOCK] per head
_KV_TAG, _DKV_TAG = 0, 1  # the two kinds of ring message that can be in flight together


# ---------------------------------------------------------------------------------------------
# Local block kernel: attention of q [b, sq, hq, d] to k, v [b, sk, hkv, d], returning the
# output and the log-sum-exp [b, hq, sq] (fp32). "causal" is bottom-right aligned, as in
# flash-attn: query i sees key j when j <= i + sk - sq.
# ---------------------------------------------------------------------------------------------


def _use_flash(q: torch.Tensor) -> bool:
    return (
        _FLASH
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[b, s, h, d] -> fp32 [b, hkv, h // hkv, s, d]: query heads grouped by their kv head."""
    b, s, h, d = x.shape
    return x.float().reshape(b, s, hkv, h // hkv, d).permute(0, 2, 3, 1, 4).contiguous()


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[b, s, hkv, d] -> fp32 [b, hkv, s, d]."""
    return x.float().transpose(1, 2).contiguous()


def _rows(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of every group member, flattened: [b, hkv, g, s, e] -> [b, hkv, g*n, e]."""
    b, hkv, g, _, e = x.shape
    return x[:, :, :, start:end].reshape(b, hkv, g * (end - start), e)


def _mask_future(scores: torch.Tensor, groups: int, q_pos0: int, k_pos0: int) -> None:
    """Set scores of keys after their query to -inf, in place. scores: [b, hkv, g*n, kn]."""
    b, hkv, rows, kn = scores.shape
    n = rows // groups
    q_pos = torch.arange(q_pos0, q_pos0 + n, device=scores.device)
    k_pos = torch.arange(k_pos0, k_pos0 + kn, device=scores.device)
    future = k_pos[None, :] > q_pos[:, None]
    scores.view(b, hkv, groups, n, kn).masked_fill_(future, float("-inf"))


def _torch_block_forward(q, k, v, scale, causal, block):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g, offset = hq // hkv, sk - sq
    qg, kt, vt = _grouped(q, hkv), _heads_first(k), _heads_first(v)
    out = torch.empty((b, hkv, g, sq, d), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, hkv, g, sq), dtype=torch.float32, device=q.device)
    for qs in range(0, sq, block):
        qe = min(qs + block, sq)
        rows = _rows(qg, qs, qe) * scale
        # Online softmax over key chunks: running max m, running sum l, unnormalized acc.
        m = torch.full(rows.shape[:-1], float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(rows)
        k_end = min(sk, qe + offset) if causal else sk
        for ks in range(0, k_end, block):
            ke = min(ks + block, k_end)
            s = rows @ kt[:, :, ks:ke].transpose(-1, -2)
            if causal and ke - 1 > qs + offset:
                _mask_future(s, g, qs + offset, ks)
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = s.sub_(m_new.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - m_new)
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + p @ vt[:, :, ks:ke]
            m = m_new
        n = qe - qs
        out[:, :, :, qs:qe] = (acc / l.unsqueeze(-1)).view(b, hkv, g, n, d)
        lse[:, :, :, qs:qe] = (m + l.log()).view(b, hkv, g, n)
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d), lse.reshape(b, hq, sq)


def _torch_block_backward(dout, q, k, v, out, lse, scale, causal, block):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g, offset = hq // hkv, sk - sq
    qg, dog, kt, vt = _grouped(q, hkv), _grouped(dout, hkv), _heads_first(k), _heads_first(v)
    delta = (dog * _grouped(out, hkv)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    lse_g = lse.float().reshape(b, hkv, g, sq, 1)
    dq = torch.zeros_like(qg)
    dk = torch.zeros_like(kt)
    dv = torch.zeros_like(vt)
    for ks in range(0, sk, block):
        ke = min(ks + block, sk)
        kc, vc = kt[:, :, ks:ke], vt[:, :, ks:ke]
        q_first = max(0, ks - offset) if causal else 0  # earlier queries see none of these keys
        for qs in range(q_first, sq, block):
            qe = min(qs + block, sq)
            rows, do_rows = _rows(qg, qs, qe), _rows(dog, qs, qe)
            s = (rows @ kc.transpose(-1, -2)).mul_(scale)
            if causal and ke - 1 > qs + offset:
                _mask_future(s, g, qs + offset, ks)
            p = s.sub_(_rows(lse_g, qs, qe)).exp_()
            dv[:, :, ks:ke] += p.transpose(-1, -2) @ do_rows
            ds = p.mul_((do_rows @ vc.transpose(-1, -2)).sub_(_rows(delta, qs, qe))).mul_(scale)
            dq[:, :, :, qs:qe] += (ds @ kc).view(b, hkv, g, qe - qs, d)
            dk[:, :, ks:ke] += ds.transpose(-1, -2) @ rows
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


def attention_block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    block: int = BLOCK,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out fp32 [b, sq, hq, d], lse fp32 [b, hq, sq]) of one block pair, GQA without repeats.

    Never holds more than a [block x block] score tile per head, so 64K-token shards fit.
    """
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(
            f"Causal block with {q.shape[1]} queries and {k.shape[1]} keys: bottom-right "
            "alignment needs at least as many keys as queries; pass causal=False or more keys."
        )
    if _use_flash(q):
        out, lse, _, _ = _flash_attn_forward(
            q, k, v, 0.0, softmax_scale, causal, -1, -1, 0.0, None, False
        )
        return out.float(), lse
    return _torch_block_forward(q, k, v, softmax_scale, causal, block)


def attention_block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    block: int = BLOCK,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (dq, dk, dv) of one block pair, given the final output and LSE of these queries.

    With the final (not the block's) out and lse, the block gradients add up exactly over blocks.
    """
    if _use_flash(q):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), dq, dk, dv,
            0.0, softmax_scale, causal, -1, -1, 0.0, None, False, None,
        )
        return dq.float(), dk.float(), dv.float()
    return _torch_block_backward(dout, q, k, v, out, lse, softmax_scale, causal, block)


# ---------------------------------------------------------------------------------------------
# The ring.
# ---------------------------------------------------------------------------------------------


def _step_plan(step: int, rank: int, causal: bool, half: int) -> Tuple[slice, slice, bool]:
    """(query rows, kv rows, causal) that interact at ``step``, when the kv of rank-step is here."""
    everything = slice(None)
    if step == 0:
        return everything, everything, causal
    if not causal:
        return everything, everything, False
    if step <= rank:  # the source rank is lower: only its first chunk lies in my past
        return everything, slice(0, half), False
    return slice(half, None), everything, False  # higher: only my second chunk follows it


def _merge(out, lse, block_out, block_lse) -> None:
    """Fold a block's (out, lse) into the running (out, lse) in place (views allowed), fp32."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)


def _ring_forward(q, k, v, scale, causal, group):
    size, rank = group_size_rank(group)
    half = q.shape[1] // 2
    kv = torch.stack([k, v])  # one message per step; GQA heads stay unrepeated
    out = lse = None
    for step in range(size):
        pending = ring_shift(kv, group, tag=_KV_TAG) if step + 1 < size else None
        rows, cols, block_causal = _step_plan(step, rank, causal, half)
        block_out, block_lse = attention_block_forward(
            q[:, rows], kv[0][:, cols], kv[1][:, cols], scale, block_causal
        )
        if out is None:
            out, lse = block_out, block_lse
        else:
            _merge(out[:, rows], lse[:, :, rows], block_out, block_lse)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, q, k, v, out, lse, scale, causal, group):
    size, rank = group_size_rank(group)
    half = q.shape[1] // 2
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])
    dkv_pending = None
    for step in range(size):
        kv_pending = ring_shift(kv, group, tag=_KV_TAG) if step + 1 < size else None
        rows, cols, block_causal = _step_plan(step, rank, causal, half)
        block_dq, block_dk, block_dv = attention_block_backward(
            dout[:, rows], q[:, rows], kv[0][:, cols], kv[1][:, cols],
            out[:, rows], lse[:, :, rows], scale, block_causal,
        )
        dq[:, rows] += block_dq
        # The dK/dV accumulated so far for the block held here arrives from the previous rank.
        if dkv_pending is None:
            dkv = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
        else:
            dkv = dkv_pending.wait()
        dkv[0][:, cols] += block_dk
        dkv[1][:, cols] += block_dv
        if size > 1:
            dkv_pending = ring_shift(dkv, group, tag=_DKV_TAG)
        if kv_pending is not None:
            kv = kv_pending.wait()
    if size > 1:  # after the last step the block held is the next rank's: one more hop home
        dkv = dkv_pending.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, group):
        out, lse = _ring_forward(q, k, v, softmax_scale, causal, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal, ctx.group = softmax_scale, causal, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, ctx.group
        )
        return dq, dk, dv, None, None, None


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
) -> torch.Tensor:
    """Exact attention over the whole sequence from zigzag shards; returns this rank's shard.

    q [b, s_local, hq, d], k and v [b, s_local, hkv, d] (hkv divides hq). Equal to full
    attention over the unsharded sequence followed by ``zigzag_split``. Without CP (group of
    size 1) k and v may be longer than q, as when decoding with a KV cache; the causal mask is
    then bottom-right aligned (the queries are the last tokens). ``group`` defaults to
    megatron's CP group when parallel_state is initialized, else the world group (or no
    communication at all in a single process without torch.distributed).
    """
    group = default_cp_group() if group is None else group
    _check_inputs(q, k, v, group_size_rank(group)[0])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _RingAttention.apply(q, k, v, scale, causal, group)
