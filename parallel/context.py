"""Context-parallel (CP) sequence layout: zigzag sharding and the CP loss reduction.

With a causal mask, later tokens attend to more keys. Cutting the sequence into ``2*cp``
chunks and giving rank ``r`` chunks ``r`` and ``2*cp-1-r`` pairs a cheap chunk with an
expensive one, so every rank does the same attention work. This is the layout of megatron's
``get_batch_on_this_cp_rank`` and of its CP-aware RoPE (``get_pos_emb_on_this_cp_rank``), so
token positions and rotary embeddings stay right.
"""

import sys
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def default_cp_group() -> Optional[dist.ProcessGroup]:
    """The CP group to use when the caller names none.

    Megatron's CP group once parallel_state is initialized, else the world group; None when
    torch.distributed is not initialized at all (a single process, CP size 1).
    """
    # Importing megatron costs seconds per process; a parallel_state that nobody imported
    # cannot be initialized, so look it up instead of importing it.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_context_parallel_group()
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def group_size_rank(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) for None, the single-process case."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group=group), dist.get_rank(group=group)


def _check_layout(length: int, cp_size: int, cp_rank: int, what: str) -> int:
    """Validate a zigzag layout and return the chunk length."""
    if cp_size < 1:
        raise ValueError(f"cp_size={cp_size}: the CP size must be >= 1.")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(
            f"cp_rank={cp_rank}: must lie in [0, cp_size={cp_size}); pass this rank's index "
            "inside the CP group."
        )
    if length % (2 * cp_size) != 0:
        raise ValueError(
            f"{what} {length} is not divisible by 2*cp_size = {2 * cp_size} (cp_size="
            f"{cp_size}): zigzag sharding cuts the sequence into 2*cp_size equal chunks; pad the "
            f"sequence to a multiple of {2 * cp_size}."
        )
    return length // (2 * cp_size)


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int) -> torch.Tensor:
    """This rank's shard of ``x``: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` along ``dim``."""
    chunk = _check_layout(x.shape[dim], cp_size, cp_rank, f"Sequence length (dim {dim})")
    first = x.narrow(dim, cp_rank * chunk, chunk)
    second = x.narrow(dim, (2 * cp_size - 1 - cp_rank) * chunk, chunk)
    return torch.cat([first, second], dim=dim)


def zigzag_merge(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The full sequence from all ranks' shards, listed in CP-rank order (inverse of split)."""
    cp_size = len(shards)
    if cp_size == 0:
        raise ValueError("zigzag_merge got no shards; pass one shard per CP rank, in rank order.")
    lengths = {s.shape[dim] for s in shards}
    if len(lengths) != 1 or next(iter(lengths)) % 2 != 0:
        raise ValueError(
            f"Shard lengths {sorted(lengths)} along dim {dim}: zigzag shards must all have the "
            "same even length (two equal chunks each)."
        )
    halves = [s.chunk(2, dim=dim) for s in shards]
    ordered = [h[0] for h in halves] + [h[1] for h in reversed(halves)]
    return torch.cat(ordered, dim=dim)


def zigzag_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions (int64) of the tokens in this rank's shard, in shard order."""
    return zigzag_split(torch.arange(seq_len), cp_size, cp_rank, dim=0)


def cp_loss_mean(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Mean loss over the non-masked tokens of the whole sequence, from this rank's shard.

    A mean of per-rank means would weight ranks with fewer valid tokens too much, so the
    (sum, count) pair is all-reduced once over the CP group, in fp32. The value is the global
    mean on every rank; its gradient flows only into this rank's tokens, so summing parameter
    gradients over the CP group yields the gradient of the global mean. ``group`` defaults to
    ``default_cp_group()``; pass it explicitly where the CP group is known.
    """
    if token_loss.shape != loss_mask.shape:
        raise ValueError(
            f"token_loss shape {tuple(token_loss.shape)} != loss_mask shape "
            f"{tuple(loss_mask.shape)}: pass one mask entry per token."
        )
    group = default_cp_group() if group is None else group
    mask = loss_mask.to(torch.float32)
    local_sum = (token_loss.to(torch.float32) * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if group_size_rank(group)[0] > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    if totals[1] == 0:
        raise ValueError(
            "cp_loss_mean: loss_mask has no valid token on any CP rank; the mean is undefined. "
            "Drop samples whose labels are all masked."
        )
    # Value: global sum; gradient: this rank's share only.
    return (local_sum + (totals[0] - local_sum.detach())) / totals[1]
