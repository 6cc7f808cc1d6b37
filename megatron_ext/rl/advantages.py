"""Advantage estimators: GRPO's group baseline, GAE for token-level PPO, and whitening.

Everything is computed in fp32 whatever the input dtype, and masked positions come back as 0,
so a padded batch can go straight into the loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_ext.training import collectives


def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6,
                    normalize_std: bool = True) -> torch.Tensor:
    """rewards `[prompts, group]` -> advantages of the same shape (fp32), centred per group.

    With `normalize_std` the centred rewards are divided by (group std + eps), the std being the
    unbiased one (torch.std, as DeepSeekMath and verl). A group whose rewards are all equal
    carries no learning signal: its advantages are exactly 0 (not rounding noise divided by eps).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}; need [prompts, group]")
    if rewards.size(1) < 2:
        raise ValueError(f"group size {rewards.size(1)} has no baseline; sample >= 2 responses "
                         "per prompt (rl.group_size)")
    r = rewards.float()
    # checked on the device, without a host sync
    torch._assert_async(torch.isfinite(r).all(), "rewards hold NaN or Inf; check the reward functions")
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    return centred.masked_fill(flat, 0.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over `[b, t]` token rewards and critic values.

    Returns (advantages, returns), fp32, 0 where mask is 0. Masked positions are skipped, not
    treated as zero-reward steps: the value and the running estimate pass through them, so a
    masked tail ends the episode at the last unmasked token (bootstrap value 0) and masked
    interior tokens (e.g. tool output) do not discount. Not whitened: call `whiten` if wanted.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [batch, tokens]")
    m = mask.float()
    r, v = (torch.where(m > 0, t.float(), 0.0) for t in (rewards, values))  # ignore pad garbage
    next_value = torch.zeros_like(v[:, 0])
    running = torch.zeros_like(v[:, 0])
    advantages = torch.zeros_like(v)
    for t in reversed(range(v.size(1))):
        delta = r[:, t] + gamma * next_value - v[:, t]
        step = delta + gamma * lam * running
        running = torch.where(m[:, t] > 0, step, running)
        next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
        advantages[:, t] = running
    return advantages * m, (advantages + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
           group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the unmasked entries, 0 where masked (fp32).

    The variance is the population one. With `group` the statistics cover the unmasked entries
    of every rank in it (an all-reduce of sum, sum of squares and count), so data-parallel ranks
    whiten their shards of one batch alike. `shift_mean=False` rescales but keeps the mean.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must match")
    m = mask.float()
    xf = torch.where(m > 0, x.float(), 0.0)
    stats = torch.stack([(xf * m).sum(), m.sum()])
    if group is not None:
        stats = collectives.all_reduce(stats, group)
    if stats[1].item() == 0:
        raise ValueError("whiten: the mask selects no entries; nothing to normalise")
    mean = stats[0] / stats[1]
    sq = ((xf - mean) ** 2 * m).sum()  # two passes: no cancellation in E[x^2] - mean^2
    if group is not None:
        sq = collectives.all_reduce(sq, group)
    var = sq / stats[1]
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m
