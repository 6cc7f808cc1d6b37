"""Pure-PyTorch kernels with the same signatures as the C++ and CUDA extensions.

They serve when no extension is built, and they are the readable statement of what the
extensions compute. The cross-entropy kernels walk [block_rows, chunk_cols] tiles of logits,
so even the fallback never holds an [n, v] tensor.
"""

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/bf16/fp16 inputs; fp64 inputs keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(n: int, v: int, block_rows: int, chunk_cols: int):
    for r0 in range(0, n, block_rows):
        for c0 in range(0, v, chunk_cols):
            yield slice(r0, min(r0 + block_rows, n)), slice(c0, min(c0 + chunk_cols, v))


def _target_in_chunk(target: torch.Tensor, cols: slice):
    """(rows whose target lies in the chunk, their column within it)."""
    local = target - cols.start
    hit = (local >= 0) & (local < cols.stop - cols.start)
    return hit.nonzero().squeeze(1), local[hit]


def ce_forward(hidden, weight, target, block_rows: int, chunk_cols: int):
    """(lse, target_logit), each [n] in the accumulation dtype; see csrc/ops_cpu.h."""
    acc = acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
    target_logit = torch.zeros(n, dtype=acc, device=hidden.device)
    for rows, cols in _tiles(n, weight.shape[0], block_rows, chunk_cols):
        logits = hidden[rows].to(acc) @ weight[cols].to(acc).t()
        lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(logits, dim=1))
        hit, col = _target_in_chunk(target[rows], cols)
        target_logit[rows.start + hit] += logits[hit, col]
    return lse, target_logit


def ce_backward(hidden, weight, target, lse, grad_scale, block_rows: int, chunk_cols: int):
    """(d_hidden in the accumulation dtype, d_weight in weight's dtype); see csrc/ops_cpu.h."""
    acc = acc_dtype(hidden.dtype)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    scale = grad_scale.to(acc)
    for rows, cols in _tiles(hidden.shape[0], weight.shape[0], block_rows, chunk_cols):
        hb, wc = hidden[rows].to(acc), weight[cols].to(acc)
        grad = (hb @ wc.t() - lse[rows, None]).exp_().mul_(scale[rows, None])
        hit, col = _target_in_chunk(target[rows], cols)
        grad[hit, col] -= scale[rows][hit]
        d_hidden[rows] += grad @ wc
        d_weight[cols] += grad.t() @ hb
    return d_hidden, d_weight.to(weight.dtype)


def swiglu_forward(x):
    """silu(a) * b, computed in at least fp32."""
    a, b = x.to(acc_dtype(x.dtype)).chunk(2, dim=-1)
    return (F.silu(a) * b).to(x.dtype)


def swiglu_backward(x, dy):
    """[d/da, d/db] of swiglu, recomputing sigmoid(a) from x."""
    acc = acc_dtype(x.dtype)
    a, b = x.to(acc).chunk(2, dim=-1)
    g = dy.to(acc)
    sig = torch.sigmoid(a)
    da = g * b * sig * (1 + a * (1 - sig))
    db = g * a * sig
    return torch.cat([da, db], dim=-1).to(x.dtype)
