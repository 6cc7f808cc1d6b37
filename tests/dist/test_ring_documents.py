"""Ring attention over packed documents on gloo: with the whole row's document ids, each zigzag
shard's output and gradients equal dense attention under the block-diagonal causal mask (fp32,
1e-5), then zigzag-split; for both block kernels, GQA, several random document layouts, a
document that crosses zigzag chunk boundaries and rows that see no key of a block."""

import pytest
import torch
import torch.distributed as dist

from parallel.context import zigzag_split
from parallel.ring_attention import ring_attention

from ._spawn import run_distributed

CHUNK = 5  # tokens per zigzag chunk: odd, so no power-of-two luck hides an indexing bug
B, HQ, HKV, D = 2, 4, 2, 8


def documents(seq: int, seed: int) -> torch.Tensor:
    """[B, seq] document ids. Row 0: one document from 3 to seq - CHUNK + 2, crossing every
    chunk boundary in between, then short ones, so the last chunk's first queries see the
    earlier chunks and its later ones see none of them. Row 1: random boundaries."""
    row0 = torch.zeros(seq, dtype=torch.long)
    row0[3:] += 1
    row0[seq - CHUNK + 2:] += 1
    row0[seq - 1:] += 1
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(seq, generator=gen) < 0.25
    starts[0] = False
    return torch.stack([row0, starts.long().cumsum(0)])


def reference(q, k, v, docs, causal, scale):
    """Dense attention under the document mask, [b, s, h, d], GQA by repeating kv heads."""
    s = q.shape[1]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    allowed = docs[:, :, None] == docs[:, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def _check(cp, rank, seed, causal, kernel):
    seq = 2 * cp * CHUNK
    docs = documents(seq, seed)
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(shape, generator=gen, dtype=torch.float64)
            for shape in ((B, seq, HQ, D), (B, seq, HKV, D), (B, seq, HKV, D), (B, seq, HQ, D))]
    q, k, v = (t.clone().requires_grad_() for t in full[:3])
    want = reference(q, k, v, docs, causal, 0.3)
    want.backward(full[3])
    local = [zigzag_split(t, cp, rank, dim=1).float() for t in full]
    lq, lk, lv = (t.requires_grad_() for t in local[:3])
    got = ring_attention(lq, lk, lv, causal=causal, softmax_scale=0.3, kernel=kernel,
                         document_ids=docs)
    got.backward(local[3])
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got, lq.grad, lk.grad, lv.grad),
                          (want, q.grad, k.grad, v.grad)):
        torch.testing.assert_close(
            g.double(), zigzag_split(w.detach(), cp, rank, dim=1), atol=1e-5, rtol=1e-5,
            msg=lambda m: f"{name} (cp={cp}, rank={rank}, seed={seed}, causal={causal}, "
                          f"kernel={kernel}): {m}")


def _all_checks(rank, world_size):
    for seed in range(3):
        for kernel in ("sdpa", "torch"):
            _check(world_size, rank, seed, True, kernel)
    _check(world_size, rank, 0, False, "sdpa")  # bidirectional within documents
    # every token its own document: only the diagonal is left, every other block skipped
    seq = 2 * world_size * CHUNK
    q = torch.randn(1, 2 * CHUNK, HQ, D)
    out = ring_attention(q, q[:, :, :HKV], q[:, :, :HKV] * 2, document_ids=torch.arange(seq)[None])
    torch.testing.assert_close(out, q[:, :, :HKV].repeat_interleave(HQ // HKV, dim=2) * 2)
    dist.barrier()


@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_isolates_documents(cp):
    run_distributed(_all_checks, cp)
