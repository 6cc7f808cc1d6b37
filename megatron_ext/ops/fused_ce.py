"""Cross-entropy of hidden @ weight^T without materialising the logits (fused linear CE).

At 64K tokens x 128K vocab the logits alone are 32 GiB in fp32 and their gradient as much
again; here the forward keeps three numbers per token (log-sum-exp, target logit, and the loss)
and the backward recomputes each logits tile to form its gradient in place.
"""

import torch
import torch.distributed as dist

from megatron_ext.ops._backend import Kernels, kernels_for

REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(hidden, weight, labels, reduction, vocab_size, rows, ignore_index) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [n, h]; got shape {tuple(hidden.shape)}; "
                         "flatten [s, b, h] to [s*b, h] first")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [v_local, h] with h = hidden.shape[1] = "
                         f"{hidden.shape[1]}; got weight shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [n] = [{hidden.shape[0]}] to match hidden; got shape "
                         f"{tuple(labels.shape)}; flatten labels the way hidden was flattened")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise TypeError(f"hidden and weight must share a floating dtype; got {hidden.dtype} and "
                        f"{weight.dtype}; cast one to the other")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer vocab ids; got dtype {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(f"hidden, weight and labels must be on one device; got {hidden.device}, "
                         f"{weight.device} and {labels.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0 < vocab_size <= rows:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {rows}], the rows of all "
                         "weight shards together; pass the real vocab (padding rows come last)")
    _check_labels(labels, vocab_size, ignore_index)


def _check_labels(labels, vocab_size, ignore_index) -> None:
    """Every label a real vocab id or ignore_index. On CPU a full check with the bad values; on
    a GPU an asynchronous device assert, so the check never waits for the device (a
    mislabelled batch still stops the run, at the next synchronisation)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    rule = f"labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}"
    fix = ("check the tokenizer's vocab size against the output layer, or mark those tokens "
           "with ignore_index")
    if labels.device.type != "cpu":
        torch._assert_async(~bad.any(), f"{rule}; {fix}")
    elif bool(bad.any()):
        where = bad.nonzero().squeeze(1)
        raise ValueError(f"{rule}; got {labels[where[:5]].tolist()} at positions "
                         f"{where[:5].tolist()} ({where.numel()} bad in all); {fix}")


def _group_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _combine_shards(lse, target_logit, tp_group):
    """Global log-sum-exp and target logit from each vocab shard's: a max, then one packed sum."""
    global_max = lse.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    packed = torch.stack([torch.exp(lse - global_max), target_logit])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
    return global_max + packed[0].log(), packed[1]


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """weight holds this rank's real vocab rows, global ids [start, start + rows). Rows whose
    label is ignore_index stay in the kernels (dropping them would need their count on the
    host, a device sync per call) with target -1 and zero gradient scale."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, start, ignore_index, reduction, tp_group, kernels,
                tile):
        valid = labels != ignore_index
        local = labels.long() - start
        target = torch.where(valid & (local >= 0) & (local < weight.shape[0]), local, -1)

        lse, target_logit = kernels.impl.ce_forward(hidden, weight, target, *tile)
        if tp_group is not None and hidden.shape[0] > 0:
            lse, target_logit = _combine_shards(lse, target_logit, tp_group)
        per_row = torch.where(valid, lse - target_logit, 0.0)
        count = valid.sum()

        ctx.save_for_backward(hidden, weight, target, lse, valid, count)
        ctx.setup = (reduction, tp_group, kernels, tile)
        if reduction == "none":
            return per_row
        total = per_row.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, target, lse, valid, count = ctx.saved_tensors
        reduction, tp_group, kernels, tile = ctx.setup
        if reduction == "mean":
            grad_out = grad_out / count
        scale = torch.where(valid, grad_out.to(lse.dtype), 0.0)
        d_hidden, d_weight = kernels.impl.ce_backward(hidden, weight, target, lse,
                                                      scale.contiguous(), *tile)
        if tp_group is not None:
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=tp_group)
        return d_hidden.to(hidden.dtype), d_weight, None, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor, *, ignore_index: int = -100,
                               reduction: str = "mean", tp_group=None,
                               vocab_size: int | None = None,
                               block_rows: int | None = None,
                               chunk_cols: int | None = None) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight^T against labels, never holding [n, v_local].

    hidden [n, h], weight [v_local, h], labels [n] of global vocab ids. With a tp_group of size
    t, rank r holds vocab rows [r*v_local, (r+1)*v_local) and the result equals the unsharded
    loss: shards combine their log-sum-exp and target logit with two all-reduces over tp_group
    (labels must be the same on every rank of the group, as megatron broadcasts them).

    vocab_size: the real vocabulary when the rows are padded (megatron pads the output layer to
    a multiple of make_vocab_size_divisible_by * t): rows with global id >= vocab_size never
    enter the softmax and get exactly zero gradient, so the loss is the same for any padding.
    A shard may be all padding. None: every row is a real id.

    Gradients flow to hidden and weight. hidden is the input megatron's output layer
    (ColumnParallelLinear) receives, identical on every rank of tp_group. Its gradient is the sum
    over vocab shards, and the backward all-reduces d_hidden over tp_group itself, so the function
    is self-contained: do not also wrap hidden in copy_to_tensor_model_parallel_region (whose
    backward is that same all-reduce). Sequence parallelism is not supported: there hidden
    comes from an all-gather whose backward already sums over ranks.

    reduction: "mean" over tokens whose label is not ignore_index (NaN when there are none, as
    in F.cross_entropy), "sum", or "none" ([n], 0 where ignored). The loss is fp32 (fp64 for
    fp64 inputs); softmax statistics and gradient sums accumulate in fp32 for bf16/fp16 inputs.
    block_rows and chunk_cols override the backend's logits tile (tests, tuning).
    """
    rank, size = _group_rank_size(tp_group)
    v_local = weight.shape[0]
    vocab = v_local * size if vocab_size is None else vocab_size
    _check_inputs(hidden, weight, labels, reduction, vocab, v_local * size, ignore_index)
    start = rank * v_local
    real = min(max(vocab - start, 0), v_local)
    if real < v_local:  # the kernels see the real rows only; autograd zero-fills the rest
        weight = weight[:real]
    kernels: Kernels = kernels_for(hidden)
    tile = (block_rows or kernels.block_rows, chunk_cols or kernels.chunk_cols)
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, start, ignore_index, reduction,
                                          tp_group if size > 1 else None, kernels, tile)
