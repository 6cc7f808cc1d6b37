"""The loss functions the megatron schedule calls on the last pipeline stage for RL micro-batches,
in per-token-loss mode: each returns (loss sum, its count, stats) and megatron divides the
gradients by the count summed over all micro-batches and DP ranks, so the update is the same
for every layout.

A micro-batch is a dict of `[b, t]` tensors aligned with the model's input `tokens` (column j
predicts `targets[:, j]`): `mask` (1 on response tokens), `old_logp` (the rollout's log-probs),
`advantages`, and `ref_logp` / `old_values` / `returns` when the algorithm uses them. The model
is called without labels, so the loss sees this rank's vocab shard of the logits `[b, t, v/tp]`.

Stats are named scalars, declared once in POLICY_METRICS / VALUE_METRICS with how the job
combines them (token-weighted sums over micro-batches and ranks, or maxima); the engine reduces
exactly what the table names and the recipe turns the sums into means.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from megatron_ext.training.engine import metrics
from megatron_ext.rl.losses import (agg_count, aggregate, kl_penalty, logprobs_and_entropy,
                                    logprobs_from_logits, policy_loss, value_loss)

# policy_loss's token-averaged metrics, reported as token-weighted sums
_TOKEN_MEANS = ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "approx_kl")
POLICY_METRICS = (metrics("loss", "count", "tokens", "pg_loss", "entropy", "kl_ref", *_TOKEN_MEANS)
                  + metrics("ratio_max", "logprob_diff_max", reduce="max"))
VALUE_METRICS = metrics("loss", "count", "tokens", "vf_clip_frac", "value_mean")


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """What the policy loss needs besides the batch (from RLConfig and the model)."""

    vocab_size: int  # real vocab: megatron's padding columns never enter the softmax
    temperature: float  # the rollout's sampling temperature (1 for greedy rollouts)
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    agg: str
    entropy_coef: float
    kl_coef: float  # > 0 with kl_mode=loss: the KL to the reference is a loss term
    kl_estimator: str


def token_logprobs(batch: Dict[str, torch.Tensor], vocab_size: int, temperature: float,
                   tp_group, logits: torch.Tensor) -> torch.Tensor:
    """log-probs of the targets, as the rollout records them (fp32, `[b, t]`)."""
    return logprobs_from_logits(logits, batch["targets"], tp_group=tp_group,
                                vocab_size=vocab_size, temperature=temperature)


def policy_objective(s: PolicySettings, tp_group, batch: Dict[str, torch.Tensor],
                     logits: torch.Tensor):
    """Clipped policy loss (+ KL to the reference, - entropy bonus), summed for megatron's
    per-token-loss mode; `logprob_diff_max` compares these log-probs with the rollout's."""
    mask = batch["mask"]
    valid = mask > 0
    # one softmax for both; the entropy is a statistic (no gradient) unless there is a bonus
    logp, entropy = logprobs_and_entropy(
        logits, batch["targets"], tp_group=tp_group, vocab_size=s.vocab_size,
        temperature=s.temperature, entropy_grad=s.entropy_coef > 0 and torch.is_grad_enabled())
    pg, m = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, eps_low=s.eps_low,
                        eps_high=s.eps_high, dual_clip=s.dual_clip, agg=s.agg, denominator=1.0)
    loss = pg
    if s.entropy_coef > 0:
        loss = loss - s.entropy_coef * aggregate(entropy, mask, s.agg, denominator=1.0)
    kl_sum = torch.zeros((), device=mask.device)
    if "ref_logp" in batch:
        kl = kl_penalty(logp, batch["ref_logp"], s.kl_estimator)
        if s.kl_coef > 0:
            loss = loss + s.kl_coef * aggregate(kl, mask, s.agg, denominator=1.0)
        kl_sum = torch.where(valid, kl.detach(), 0.0).sum()
    count = agg_count(mask, s.agg)
    tokens = valid.sum().float()
    with torch.no_grad():
        diff = torch.where(valid, (logp - batch["old_logp"].float()).abs(), 0.0).amax()
        stats = {"loss": loss.detach().clone(), "count": count, "tokens": tokens,
                 "pg_loss": pg.detach(), "entropy": torch.where(valid, entropy.detach(), 0.0).sum(),
                 "kl_ref": kl_sum, "ratio_max": m["ratio_max"], "logprob_diff_max": diff,
                 **{k: m[k] * tokens for k in _TOKEN_MEANS}}
    return loss, count.to(torch.int), stats


def value_objective(clip: float, agg: str, batch: Dict[str, torch.Tensor], values: torch.Tensor):
    """The critic's clipped value loss on its `[b, t, 1]` output, summed like the policy's."""
    mask = batch["mask"]
    v = values[..., 0]
    loss, m = value_loss(v, batch["old_values"], batch["returns"], mask, clip or None, agg=agg,
                         denominator=1.0)
    count = agg_count(mask, agg)
    tokens = (mask > 0).sum().float()
    return loss, count.to(torch.int), {
        "loss": loss.detach().clone(), "count": count, "tokens": tokens,
        "vf_clip_frac": m["vf_clip_frac"] * tokens, "value_mean": m["value_mean"] * tokens}


def logprob_output(vocab_size: int, temperature: float, tp_group,
                   batch: Dict[str, torch.Tensor], logits: torch.Tensor):
    """Forward-only: the targets' log-probs as a per-micro-batch output (the reference)."""
    logp = token_logprobs(batch, vocab_size, temperature, tp_group, logits)
    zero = torch.zeros((), device=logits.device)
    return zero, torch.zeros((), dtype=torch.int), {"out": logp.detach()}


def value_output(batch: Dict[str, torch.Tensor], values: torch.Tensor):
    """Forward-only: the critic's per-token values `[b, t]` (fp32) as the output."""
    zero = torch.zeros((), device=values.device)
    return zero, torch.zeros((), dtype=torch.int), {"out": values[..., 0].detach().float()}
