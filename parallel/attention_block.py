"""Attention of one block pair, with its log-sum-exp: the local kernel under ring attention.

q [b, sq, hq, d] against k, v [b, sk, hkv, d] (hkv divides hq); returns the output and the
log-sum-exp [b, hq, sq], both fp32, and in backward the fp32 gradients given the *final*
output and log-sum-exp of these queries (with those, block gradients add up exactly over
blocks). "causal" is bottom-right aligned, as in flash-attn: query i sees key j when
j <= i + sk - sq. Instead of a causal pattern a block can take ``bounds`` (first, last) [b, sq]:
query i of batch row n sees keys first[n, i]..last[n, i] only (packed documents: its own
document's keys, up to itself); a row with first > last sees no key of the block, and gets out 0
and log-sum-exp -inf, which ``merge`` folds in exactly.

Two kernels:
  "sdpa"   torch's fused SDPA ops that return the log-sum-exp, with their own backward ops:
           ``_scaled_dot_product_flash_attention_for_cpu`` on CPU (any dtype, run in fp32) and
           ``_scaled_dot_product_flash_attention`` on CUDA (fp16/bf16, head dim <= 256 and a
           multiple of 8). Elsewhere (CUDA fp32, other head dims) the reference serves.
           Both ops align a causal mask top-left, so a causal block with more keys than queries
           runs as a full piece (the keys every query sees) and a square causal piece, merged.
           Bounds become the CPU op's additive mask, ``block`` query rows at a time over only
           the keys those rows see; the CUDA flash op takes no mask, so on CUDA a block with
           bounds runs on the reference.
  "torch"  the pure-PyTorch reference: online softmax over [block x block] score tiles.
flex_attention also returns the log-sum-exp but has no backward on CPU (torch 2.13).
"""

from typing import List, Optional, Tuple

import torch

Bounds = Tuple[torch.Tensor, torch.Tensor]  # (first, last) key each query sees, int64 [b, sq]

BLOCK = 1024  # query/key chunk of the PyTorch kernel: score tiles stay [BLOCK x BLOCK] per head
KERNELS = ("sdpa", "torch")
_HALF = (torch.float16, torch.bfloat16)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf (a row that has seen no key yet) as 0, so exp(x - it) is 0, never NaN."""
    return lse.masked_fill(lse == float("-inf"), 0.0)


def merge(out, lse, block_out, block_lse) -> None:
    """Fold a block's (out, lse) into the running (out, lse) in place (views allowed), fp32.
    Rows that neither has seen a key of stay (0, -inf)."""
    new_lse = torch.logaddexp(lse, block_lse)
    ref = _finite(new_lse)
    out.mul_(torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - ref).transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)


# ---------------------------------------------------------------------------------------------
# The reference kernel.
# ---------------------------------------------------------------------------------------------


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


def _mask_outside(scores: torch.Tensor, groups: int, bounds: Bounds, qs: int, qe: int,
                  ks: int) -> None:
    """Set scores of keys outside each query's bounds to -inf, in place (queries qs..qe, keys
    from ks). scores: [b, hkv, g*n, kn]."""
    b, hkv, rows, kn = scores.shape
    keys = torch.arange(ks, ks + kn, device=scores.device)
    first, last = (x[:, qs:qe, None] for x in bounds)
    outside = (keys < first) | (keys > last)  # [b, n, kn]
    scores.view(b, hkv, groups, rows // groups, kn).masked_fill_(outside[:, None, None],
                                                                 float("-inf"))


def _torch_forward(q, k, v, scale, causal, block, bounds=None):
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
            if bounds is not None:
                _mask_outside(s, g, bounds, qs, qe, ks)
            m_new = torch.maximum(m, s.amax(dim=-1))
            ref = _finite(m_new)  # a row without a visible key so far: p and alpha are 0
            p = s.sub_(ref.unsqueeze(-1)).exp_()
            alpha = torch.exp(m - ref)
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + p @ vt[:, :, ks:ke]
            m = m_new
        n = qe - qs
        # l is 0 (a row that sees no key: acc is 0 too, out 0, lse -inf) or at least 1
        out[:, :, :, qs:qe] = (acc / l.clamp_min(1.0).unsqueeze(-1)).view(b, hkv, g, n, d)
        lse[:, :, :, qs:qe] = (m + l.log()).view(b, hkv, g, n)
    return out.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d), lse.reshape(b, hq, sq)


def _torch_backward(dout, q, k, v, out, lse, scale, causal, block, bounds=None):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g, offset = hq // hkv, sk - sq
    qg, dog, kt, vt = _grouped(q, hkv), _grouped(dout, hkv), _heads_first(k), _heads_first(v)
    delta = (dog * _grouped(out, hkv)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    lse_g = _finite(lse.float()).reshape(b, hkv, g, sq, 1)
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
            if bounds is not None:
                _mask_outside(s, g, bounds, qs, qe, ks)
            p = s.sub_(_rows(lse_g, qs, qe)).exp_()
            dv[:, :, ks:ke] += p.transpose(-1, -2) @ do_rows
            ds = p.mul_((do_rows @ vc.transpose(-1, -2)).sub_(_rows(delta, qs, qe))).mul_(scale)
            dq[:, :, :, qs:qe] += (ds @ kc).view(b, hkv, g, qe - qs, d)
            dk[:, :, ks:ke] += ds.transpose(-1, -2) @ rows
    dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    return dq, dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# torch's fused SDPA ops. They take [b, h, s, d] views of our [b, s, h, d] tensors and return
# tensors laid out [b, s, h, d] in memory (CPU), so the transposes back are free.
# ---------------------------------------------------------------------------------------------


def _uses_sdpa_op(q: torch.Tensor) -> bool:
    if q.device.type == "cpu":
        return True
    d = q.shape[-1]
    return q.is_cuda and q.dtype in _HALF and d % 8 == 0 and d <= 256


def _pieces(sq: int, sk: int, causal: bool) -> List[Tuple[slice, bool]]:
    """(keys, causal) pieces that make up the bottom-right causal (or full) pattern; each
    causal piece is square, where the ops' top-left alignment is the same thing."""
    past = sk - sq if causal else sk
    pieces = [(slice(0, past), False)] if past else []
    return pieces + ([(slice(past, sk), True)] if causal else [])


def _op_inputs(tensors, like: torch.Tensor):
    """[b, s, h, d] -> [b, h, s, d] views in the op's dtype: fp32 on CPU (fp32 statistics and
    output, as the reference), the input's half dtype on CUDA."""
    dtype = torch.float32 if like.device.type == "cpu" else like.dtype
    return [t.to(dtype).transpose(1, 2) for t in tensors]


def _additive_mask(bounds: Bounds, sk: int) -> torch.Tensor:
    """fp32 [b, 1, sq, sk]: 0 where a query sees the key, -inf elsewhere (the CPU op's mask)."""
    keys = torch.arange(sk, device=bounds[0].device)
    outside = (keys < bounds[0][..., None]) | (keys > bounds[1][..., None])
    return torch.zeros(outside.shape, device=outside.device).masked_fill_(
        outside, float("-inf")).unsqueeze(1)


def _op_forward(q, k, v, scale, causal, bounds=None):
    qt, kt, vt = _op_inputs((q, k, v), q)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, causal, scale=scale)[:2]
    else:
        mask = None if bounds is None else _additive_mask(bounds, k.shape[1])
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, attn_mask=mask, scale=scale)
        if bounds is not None:  # the op gives a row that sees no key lse 0 (and out 0)
            lse = lse.masked_fill((bounds[0] > bounds[1])[:, None], float("-inf"))
    return out.transpose(1, 2).float(), lse


def _op_backward(dout, q, k, v, out, lse, scale, causal, bounds=None):
    args = _op_inputs((dout, q, k, v, out), q)
    lse = _finite(lse).contiguous()
    if q.is_cuda:
        unused = torch.empty(0, dtype=torch.uint64, device=q.device)  # philox state: no dropout
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *args, lse, None, None, q.shape[1], k.shape[1], 0.0, causal, unused, unused,
            scale=scale)
    else:
        mask = None if bounds is None else _additive_mask(bounds, k.shape[1])
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse, 0.0, causal, attn_mask=mask, scale=scale)
    return tuple(g.transpose(1, 2).float() for g in grads)


def _sdpa_forward(q, k, v, scale, causal):
    pieces = _pieces(q.shape[1], k.shape[1], causal)
    out, lse = _op_forward(q, k[:, pieces[0][0]], v[:, pieces[0][0]], scale, pieces[0][1])
    for keys, piece_causal in pieces[1:]:
        merge(out, lse, *_op_forward(q, k[:, keys], v[:, keys], scale, piece_causal))
    return out, lse


def _sdpa_backward(dout, q, k, v, out, lse, scale, causal):
    pieces = _pieces(q.shape[1], k.shape[1], causal)
    if len(pieces) == 1:
        return _op_backward(dout, q, k, v, out, lse, scale, pieces[0][1])
    dq = 0
    dk = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.empty_like(dk)
    for keys, piece_causal in pieces:
        piece_dq, dk[:, keys], dv[:, keys] = _op_backward(
            dout, q, k[:, keys], v[:, keys], out, lse, scale, piece_causal)
        dq = dq + piece_dq
    return dq, dk, dv


def _bounded_pieces(bounds: Bounds, block: int):
    """(query rows, key span, their bounds within the span) of a bounded block, ``block`` query
    rows at a time: each piece's keys are only the span its rows see (its mask stays [block x
    span], and work outside every row's document is not done); pieces that see nothing are
    left out. One host sync."""
    first, last = bounds
    sq = first.shape[1]
    starts = list(range(0, sq, block))
    seen = first <= last
    big = torch.iinfo(first.dtype).max
    spans = torch.stack([torch.stack([first[:, r:r + block].masked_fill(~seen[:, r:r + block], big)
                                      .min(), last[:, r:r + block].max()]) for r in starts])
    for r, (lo, hi) in zip(starts, spans.tolist()):
        if lo <= hi:
            rows, keys = slice(r, r + block), slice(lo, hi + 1)
            yield rows, keys, (first[:, rows] - lo, last[:, rows] - lo)


def _masked_op_forward(q, k, v, scale, bounds, block):
    b, sq, hq, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), device=q.device)
    for rows, keys, piece in _bounded_pieces(bounds, block):
        out[:, rows], lse[:, :, rows] = _op_forward(q[:, rows], k[:, keys], v[:, keys], scale,
                                                    False, piece)
    return out, lse


def _masked_op_backward(dout, q, k, v, out, lse, scale, bounds, block):
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    for rows, keys, piece in _bounded_pieces(bounds, block):
        piece_dq, piece_dk, piece_dv = _op_backward(
            dout[:, rows], q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, :, rows],
            scale, False, piece)
        dq[:, rows] = piece_dq
        dk[:, keys] += piece_dk
        dv[:, keys] += piece_dv
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The entry points.
# ---------------------------------------------------------------------------------------------


def _check(q, k, causal: bool, kernel: str, bounds: Optional[Bounds]) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"attention block kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if bounds is not None and (causal or any(x.shape != q.shape[:2] for x in bounds)):
        raise ValueError(
            f"attention block bounds of shapes {[tuple(x.shape) for x in bounds]} with causal="
            f"{causal}: bounds replace the causal pattern and give each of the "
            f"{tuple(q.shape[:2])} queries its (first, last) key; pass causal=False and [b, sq] "
            "bounds.")
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(
            f"Causal block with {q.shape[1]} queries and {k.shape[1]} keys: bottom-right "
            "alignment needs at least as many keys as queries; pass causal=False or more keys."
        )


def attention_block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float,
    causal: bool,
    block: int = BLOCK,
    kernel: str = "sdpa",
    bounds: Optional[Bounds] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out fp32 [b, sq, hq, d], lse fp32 [b, hq, sq]) of one block pair, GQA without repeats.

    Neither kernel holds a full score matrix (the reference: one [block x block] tile per head),
    so 64K-token shards fit (with ``bounds`` the CPU op's mask is [block x keys seen]).
    ``block`` sizes the reference's tiles and the masked op's query pieces.
    """
    _check(q, k, causal, kernel, bounds)
    if bounds is not None and kernel == "sdpa" and q.device.type == "cpu":
        return _masked_op_forward(q, k, v, softmax_scale, bounds, block)
    if kernel == "sdpa" and _uses_sdpa_op(q) and bounds is None:
        return _sdpa_forward(q, k, v, softmax_scale, causal)
    return _torch_forward(q, k, v, softmax_scale, causal, block, bounds)


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
    kernel: str = "sdpa",
    bounds: Optional[Bounds] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (dq, dk, dv) of one block pair, given the final output and LSE of these queries."""
    _check(q, k, causal, kernel, bounds)
    if bounds is not None and kernel == "sdpa" and q.device.type == "cpu":
        return _masked_op_backward(dout, q, k, v, out, lse, softmax_scale, bounds, block)
    if kernel == "sdpa" and _uses_sdpa_op(q) and bounds is None:
        return _sdpa_backward(dout, q, k, v, out, lse, softmax_scale, causal)
    return _torch_backward(dout, q, k, v, out, lse, softmax_scale, causal, block, bounds)
