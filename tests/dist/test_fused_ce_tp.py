"""Vocab-parallel fused linear cross-entropy on gloo equals the unsharded loss and grads, and
the GPT's vocab padding stays out of every loss.

One launch per TP size, each running every backend, reduction and case (a launch costs
seconds here). Each rank holds weight rows [r*v_local, (r+1)*v_local) and the full hidden,
as megatron's output layer sees it; d_hidden must come back summed over the vocab shards.
Padded cases: the rows past the real vocab (a whole shard of them, in some) never enter the
softmax and get zero gradient. Then the GPT with the byte vocab (259 rows, padded to 384 at
TP1 and 512 at TP2 and TP4, where rank 3 is all padding) at TP1 and TP=world.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._spawn import run_distributed

# (n tokens, h, v_local, block_rows, chunk_cols, dtype, padding rows after the real vocab):
# 3 pads the last shard partly; v_local + 1 makes the last shard all padding
CASES = [
    (37, 8, 13, 16, 5, torch.float32, 0),
    (64, 16, 50, 64, 4096, torch.float64, 0),
    (20, 4, 3, 7, 2, torch.float32, 0),
    (33, 8, 13, 16, 5, torch.float32, 3),
    (29, 8, 11, 8, 4, torch.float64, 12),
]


def _check_all(rank, world_size):
    from megatron_ext.ops import available_backends, fused_linear_cross_entropy, set_backend

    group = dist.new_group(list(range(world_size)))
    for backend in [b for b in ("cpp", "torch") if b in available_backends()]:
        set_backend(backend)
        for index, (n, h, v_local, block_rows, chunk_cols, dtype, pad) in enumerate(CASES):
            gen = torch.Generator().manual_seed(index)  # same tensors on every rank
            rows = v_local * world_size
            vocab = rows - pad
            hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
            weight = torch.randn(rows, h, generator=gen, dtype=torch.float64) / h**0.5
            labels = torch.randint(0, vocab, (n,), generator=gen)
            labels[torch.rand(n, generator=gen) < 0.25] = -100
            shard = slice(rank * v_local, (rank + 1) * v_local)
            for reduction in ("mean", "sum", "none"):
                grad_out = torch.tensor(1.3)
                if reduction == "none":
                    grad_out = torch.rand(n, generator=gen)
                h_ref = hidden.clone().requires_grad_()
                w_ref = weight.clone().requires_grad_()
                ref = F.cross_entropy(h_ref @ w_ref[:vocab].t(), labels, reduction=reduction)
                ref.backward(grad_out.double())

                h_tp = hidden.to(dtype, copy=True).requires_grad_()
                w_tp = weight[shard].to(dtype, copy=True).requires_grad_()
                loss = fused_linear_cross_entropy(h_tp, w_tp, labels, reduction=reduction,
                                                  tp_group=group, block_rows=block_rows,
                                                  chunk_cols=chunk_cols,
                                                  vocab_size=vocab if pad else None)
                loss.backward(grad_out.to(loss.dtype))

                where = f"rank {rank}/{world_size} {backend} case {index} {reduction}"
                rtol = 1e-5 if dtype == torch.float32 else 1e-10
                for got, want, what in [(loss, ref, "loss"), (h_tp.grad, h_ref.grad, "d_hidden"),
                                        (w_tp.grad, w_ref.grad[shard], "d_weight")]:
                    err = (got.detach().double() - want.detach()).abs().max().item()
                    scale = want.abs().max().item()
                    assert err <= rtol * scale + 1e-12, f"{where} {what}: error {err:.3g}"
                padding = torch.arange(rank * v_local, (rank + 1) * v_local) >= vocab
                assert torch.count_nonzero(w_tp.grad[padding]) == 0, where
    set_backend(None)


def _model_checks(rank, world_size):
    """TP1 and TP=world: the same initial weights (padding rows zero), the fused and the
    unfused loss equal to the cross-entropy over the real columns of the logits, exactly zero
    gradient on the padding rows, the same greedy generation."""
    from megatron_ext import compat

    compat.setup()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_ext.config.schema import Config
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.models.generate import SamplingParams, generate
    from megatron_ext.models.gpt import build_gpt_chunks
    from megatron_ext.models.reshard import gather_full_state
    from parallel import topology

    tok = ByteTokenizer()
    vocab = tok.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, vocab, (2, 2, 9), generator=gen)
    positions = torch.arange(9).expand(2, -1)
    prompts = [[tok.bos_id, *tok.encode("12+3=")], [tok.bos_id, *tok.encode("7")]]
    first_weights = first_tokens = None
    for tp in (1, world_size):
        for fused in (True, False):
            cfg = Config()
            cfg.parallel.tp, cfg.model.fused_loss, cfg.model.num_query_groups = tp, fused, 4
            topo = topology.initialize(topology.ParallelDims(world_size, tp=tp), seed=5)
            [model] = build_gpt_chunks(cfg, topo, vocab)
            where = f"rank {rank} tp {tp} fused {fused}"
            v_local = model.output_layer.weight.shape[0]
            padding = torch.arange(topo.tp_rank * v_local, (topo.tp_rank + 1) * v_local) >= vocab
            assert model.vocab_size == v_local * tp and (padding[-1] or topo.tp_rank < tp - 1)
            for weight in (model.output_layer.weight, model.embedding.word_embeddings.weight):
                assert torch.count_nonzero(weight[padding]) == 0, where

            full = gather_full_state([model], topo)
            if full is not None:
                first_weights = first_weights or full
                for name, tensor in full.items():
                    want = first_weights[name]
                    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        tensor, want = tensor[:vocab], want[:vocab]
                    assert torch.equal(tensor, want), (where, name)

            with torch.no_grad():
                logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
            want = F.cross_entropy(logits[..., :vocab].reshape(-1, vocab).double(),
                                   labels.reshape(-1), reduction="none").view(2, 9)
            leaked = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                     labels.reshape(-1), reduction="none").view(2, 9)
            assert (leaked - want).abs().min() > 0.1, where  # so a leak would show
            loss = model(tokens, positions, None, labels=labels)
            assert (loss.double() - want).abs().max() < 1e-5, where
            loss.sum().backward()
            grad = model.output_layer.weight.grad
            assert torch.count_nonzero(grad[padding]) == 0 and grad[~padding].abs().sum(1).gt(0).all(), where
            assert torch.count_nonzero(model.embedding.word_embeddings.weight.grad[padding]) == 0

            greedy = generate(model, prompts, tok, SamplingParams(max_new_tokens=6, temperature=0),
                              vocab_size=vocab, generator=None, tp_group=topo.tp_group,
                              pp_group=topo.pp_group)
            first_tokens = first_tokens if first_tokens is not None else greedy.tokens
            assert torch.equal(greedy.tokens, first_tokens), where
            ps.destroy_model_parallel()


def _checks(rank, world_size):
    _check_all(rank, world_size)
    _model_checks(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_vocab_parallel_equals_unsharded(world_size):
    run_distributed(_checks, world_size)
