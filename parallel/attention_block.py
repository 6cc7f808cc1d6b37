"""Attention of one block pair, with its log-sum-exp: the local kernel under ring attention.

q [b, sq, hq, d] against k, v [b, sk, hkv, d] (hkv divides hq); returns the output and the
log-sum-exp [b, hq, sq], both fp32, and in backward the fp32 gradients given the *final*
output and log-sum-exp of these queries (with those, block gradients add up exactly over
blocks). "causal" is bottom-right aligned, as in flash-attn: query i sees key j when
j <= i + sk - sq.

Two kernels:
  "sdpa"   torch's fused SDPA ops that return the log-sum-exp, with their own backward ops:
           ``_scaled_dot_product_flash_attention_for_cpu`` on CPU (any dtype, run in fp32) and
           ``_scaled_dot_product_flash_attention`` on CUDA (fp16/bf16, head dim <= 256 and a
           multiple of 8). Elsewhere (CUDA fp32, other head dims) the reference serves.
           Both ops align a causal mask top-left, so a causal block with more keys than queries
           runs as a full piece (the keys every query sees) and a square causal piece, merged.
  "torch"  the pure-PyTorch reference: online softmax over [block x block] score tiles.
flex_attention also returns the log-sum-exp but has no backward on CPU (torch 2.13).
"""

from typing import List, Tuple

import torch

BLOCK = 1024  # query/key chunk of the PyTorch kernel: score tiles stay [BLOCK x BLOCK] per head
KERNELS = ("sdpa", "torch")
_HALF = (torch.float16, torch.bfloat16)


def merge(out, lse, block_out, block_lse) -> None:
    """Fold a block's (out, lse) into the running (out, lse) in place (views allowed), fp32."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).transpose(1, 2).unsqueeze(-1))
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


def _torch_forward(q, k, v, scale, causal, block):
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


def _torch_backward(dout, q, k, v, out, lse, scale, causal, block):
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


def _op_forward(q, k, v, scale, causal):
    qt, kt, vt = _op_inputs((q, k, v), q)
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=scale)
    return out.transpose(1, 2).float(), lse


def _op_backward(dout, q, k, v, out, lse, scale, causal):
    args = _op_inputs((dout, q, k, v, out), q)
    lse = lse.contiguous()
    if q.is_cuda:
        unused = torch.empty(0, dtype=torch.uint64, device=q.device)  # philox state: no dropout
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *args, lse, None, None, q.shape[1], k.shape[1], 0.0, causal, unused, unused,
            scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *args, lse, 0.0, causal, scale=scale)
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


# ---------------------------------------------------------------------------------------------
# The entry points.
# ---------------------------------------------------------------------------------------------


def _check(q, k, causal: bool, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"attention block kernel {kernel!r} is not one of {', '.join(KERNELS)}")
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out fp32 [b, sq, hq, d], lse fp32 [b, hq, sq]) of one block pair, GQA without repeats.

    Neither kernel holds a full score matrix (the reference: one [block x block] tile per head),
    so 64K-token shards fit. ``block`` sizes the reference's tiles.
    """
    _check(q, k, causal, kernel)
    if kernel == "sdpa" and _uses_sdpa_op(q):
        return _sdpa_forward(q, k, v, softmax_scale, causal)
    return _torch_forward(q, k, v, softmax_scale, causal, block)


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (dq, dk, dv) of one block pair, given the final output and LSE of these queries."""
    _check(q, k, causal, kernel)
    if kernel == "sdpa" and _uses_sdpa_op(q):
        return _sdpa_backward(dout, q, k, v, out, lse, softmax_scale, causal)
    return _torch_backward(dout, q, k, v, out, lse, softmax_scale, causal, block)
