"""Rollout groups -> training rows, and rows -> micro-batches for the megatron schedule.

Rows are shifted once here: `tokens` is the model input (rollout tokens[:, :-1]), `targets` the
next tokens, and `mask` / `old_logp` the rollout's response_mask[:, 1:] / logprobs[:, 1:], as
`Rollout` prescribes. Every row starts at position 0, as it did when it was generated."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from megatron_ext.rl.experience import Group

Rows = Dict[str, torch.Tensor]


def _right_pad(t: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    return F.pad(t, (0, length - t.size(1)), value=value)


def rows_from_groups(groups: Sequence[Group], pad_id: int) -> Rows:
    """The kept groups as one batch of shifted rows `[n, L-1]`, n = groups x group size."""
    length = max(g.tokens.size(1) for g in groups)
    tokens = torch.cat([_right_pad(g.tokens, length, pad_id) for g in groups])
    mask = torch.cat([_right_pad(g.response_mask, length) for g in groups])
    logprobs = torch.cat([_right_pad(g.logprobs, length) for g in groups])
    return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "mask": mask[:, 1:].contiguous(), "old_logp": logprobs[:, 1:].contiguous()}


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[n]` sequence rewards placed on each row's last response token: PPO's token rewards.
    Data-independent tensor ops only (no boolean indexing), so no host sync on a GPU."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).amax(dim=1)
    placed = torch.zeros_like(mask, dtype=torch.float32).scatter(
        1, last.clamp(min=0)[:, None], rewards.float()[:, None])
    return placed * (last >= 0).float()[:, None]


def micro_batches(rows: Rows, micro_batch_size: int, device: torch.device) -> List[Rows]:
    """Cut rows into micro-batches of exactly `micro_batch_size` (the pipeline's p2p shapes are
    fixed); the last is padded with all-masked zero rows. Adds position ids. At least one
    micro-batch even for zero rows, so every rank runs the same collectives."""
    n, width = rows["tokens"].shape
    count = max(1, math.ceil(n / micro_batch_size))
    padded = {k: F.pad(v, [0, 0] * (v.dim() - 1) + [0, count * micro_batch_size - n])
              for k, v in rows.items()}
    positions = torch.arange(width).expand(micro_batch_size, -1).contiguous()
    out = []
    for i in range(count):
        part = {k: v[i * micro_batch_size:(i + 1) * micro_batch_size].to(device)
                for k, v in padded.items()}
        part["position_ids"] = positions.to(device)
        out.append(part)
    return out
