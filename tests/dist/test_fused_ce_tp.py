"""Vocab-parallel fused linear cross-entropy on gloo equals the unsharded loss and grads.

One launch per TP size, each running every backend, reduction and case (a launch costs
seconds here). Each rank holds weight rows [r*v_local, (r+1)*v_local) and the full hidden,
as megatron's output layer sees it; d_hidden must come back summed over the vocab shards.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._spawn import run_distributed

# (n tokens, h, v_local, block_rows, chunk_cols, dtype)
CASES = [
    (37, 8, 13, 16, 5, torch.float32),
    (64, 16, 50, 64, 4096, torch.float64),
    (20, 4, 3, 7, 2, torch.float32),
]


def _check_all(rank, world_size):
    from megatron_ext.ops import available_backends, fused_linear_cross_entropy, set_backend

    group = dist.new_group(list(range(world_size)))
    for backend in [b for b in ("cpp", "torch") if b in available_backends()]:
        set_backend(backend)
        for index, (n, h, v_local, block_rows, chunk_cols, dtype) in enumerate(CASES):
            gen = torch.Generator().manual_seed(index)  # same tensors on every rank
            vocab = v_local * world_size
            hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
            weight = torch.randn(vocab, h, generator=gen, dtype=torch.float64) / h**0.5
            labels = torch.randint(0, vocab, (n,), generator=gen)
            labels[torch.rand(n, generator=gen) < 0.25] = -100
            shard = slice(rank * v_local, (rank + 1) * v_local)
            for reduction in ("mean", "sum", "none"):
                grad_out = torch.tensor(1.3)
                if reduction == "none":
                    grad_out = torch.rand(n, generator=gen)
                h_ref = hidden.clone().requires_grad_()
                w_ref = weight.clone().requires_grad_()
                ref = F.cross_entropy(h_ref @ w_ref.t(), labels, reduction=reduction)
                ref.backward(grad_out.double())

                h_tp = hidden.to(dtype, copy=True).requires_grad_()
                w_tp = weight[shard].to(dtype, copy=True).requires_grad_()
                loss = fused_linear_cross_entropy(h_tp, w_tp, labels, reduction=reduction,
                                                  tp_group=group, block_rows=block_rows,
                                                  chunk_cols=chunk_cols)
                loss.backward(grad_out.to(loss.dtype))

                where = f"rank {rank}/{world_size} {backend} case {index} {reduction}"
                rtol = 1e-5 if dtype == torch.float32 else 1e-10
                for got, want, what in [(loss, ref, "loss"), (h_tp.grad, h_ref.grad, "d_hidden"),
                                        (w_tp.grad, w_ref.grad[shard], "d_weight")]:
                    err = (got.detach().double() - want.detach()).abs().max().item()
                    scale = want.abs().max().item()
                    assert err <= rtol * scale + 1e-12, f"{where} {what}: error {err:.3g}"
    set_backend(None)


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_equals_unsharded(world_size):
    run_distributed(_check_all, world_size)
