"""RL losses: the clipped policy objective, the clipped value loss, KL estimators, and exact
entropy / log-probabilities from vocab-parallel logits.

All statistics are accumulated in fp32 whatever the input dtype. Per-token inputs are `[b, t]`
with a `mask` of the same shape (1 on response tokens); masked entries may hold anything
(padding garbage, -inf) and never reach a loss, a metric or a gradient.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: far outside any clip range, far from fp32 overflow

Number = Union[float, torch.Tensor]


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask > 0


def agg_count(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """The local denominator of `agg`: unmasked tokens (token-mean) or sequences with at least
    one unmasked token (seq-mean-*). Sum it over micro-batches and DP ranks to get the global
    `denominator` for `aggregate` / `policy_loss`."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGREGATIONS)}")
    valid = _valid(mask)
    if agg == "token-mean":
        return valid.sum().float()
    return valid.any(dim=-1).sum().float()


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", *,
              denominator: Optional[Number] = None) -> torch.Tensor:
    """Reduce per-token `values` `[b, t]` to a scalar (fp32).

    token-mean: sum over unmasked tokens / token count (long answers weigh more, as in DAPO).
    seq-mean-token-sum: per-sequence sum, averaged over sequences (Dr. GRPO style).
    seq-mean-token-mean: per-sequence mean, averaged over sequences (the original GRPO).
    The numerator is divided by `denominator` when given, else by `agg_count(mask, agg)`: pass
    the global count when one batch is split over micro-batches or ranks, so that the sum of
    the parts is the mean of the whole (or 1.0 to get the plain sum for megatron's per-token
    loss mode).
    """
    valid = _valid(mask)
    v = torch.where(valid, values.float(), 0.0)
    if agg == "token-mean":
        total = v.sum()
    elif agg == "seq-mean-token-sum":
        total = v.sum(dim=-1).sum()
    elif agg == "seq-mean-token-mean":
        total = (v.sum(dim=-1) / valid.sum(dim=-1).clamp_min(1)).sum()
    else:
        raise ValueError(f"agg={agg!r} is not one of {', '.join(AGGREGATIONS)}")
    if denominator is None:  # an empty mask gives a loss of 0, not NaN
        return total / agg_count(mask, agg).clamp_min(1.0)
    if not isinstance(denominator, torch.Tensor) and denominator <= 0:
        raise ValueError(f"denominator={denominator} must be > 0 (a token or sequence count)")
    return total / denominator


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x.float(), 0.0).sum() / valid.sum().clamp_min(1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.28,
                dual_clip: Optional[float] = None, agg: str = "token-mean",
                denominator: Optional[Number] = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The negated PPO clipped objective, `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)` per
    token with r = exp(logp - old_logp), aggregated by `agg` (see `aggregate`).

    logp (differentiable), old_logp (the behaviour policy's) and mask are `[b, t]`; advantages
    are `[b, t]` or `[b]` (one per sequence, as GRPO gives). `dual_clip` c > 1 additionally caps
    the loss of negative-advantage tokens at c*|A|, so one token whose ratio exploded cannot
    dominate the batch. The log-ratio is clamped to +-20 before exp.

    metrics (0-dim fp32 tensors, detached, means over unmasked tokens):
      clip_frac       share where the clipped term is the one taken (it is strictly larger)
      clip_frac_high  ... because r > 1+eps_high (A > 0)
      clip_frac_low   ... because r < 1-eps_low (A < 0)
      dual_clip_frac  share capped by the dual clip (0 when off)
      ratio_mean, ratio_max
      approx_kl       mean of k3 = (r - 1) - log r, an unbiased, non-negative estimate of
                      KL(old || new) from samples of the old policy
    """
    if dual_clip and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (or None to turn it off)")
    if not (logp.shape == old_logp.shape == mask.shape):
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must match")
    valid = _valid(mask)
    adv = advantages.float()
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)
    adv = torch.where(valid, adv.expand(logp.shape), 0.0)
    log_ratio = torch.where(valid, logp.float() - old_logp.float(), 0.0)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    token_loss = torch.maximum(unclipped, clipped)
    took_clip = clipped > unclipped
    dual = torch.zeros_like(valid)
    if dual_clip:
        cap = -adv * dual_clip
        dual = (adv < 0) & (token_loss > cap)
        token_loss = torch.where(dual, cap, token_loss)
    loss = aggregate(token_loss, mask, agg, denominator=denominator)

    with torch.no_grad():
        r = ratio.detach()
        metrics = {
            "clip_frac": _masked_mean(took_clip, valid),
            "clip_frac_high": _masked_mean(took_clip & (r > 1.0 + eps_high), valid),
            "clip_frac_low": _masked_mean(took_clip & (r < 1.0 - eps_low), valid),
            "dual_clip_frac": _masked_mean(dual, valid),
            "ratio_mean": _masked_mean(r, valid),
            "ratio_max": torch.where(valid, r, 0.0).amax(),  # r > 0: 0 only when all masked
            "approx_kl": _masked_mean((r - 1.0) - log_ratio.detach(), valid),
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: Optional[float], *, agg: str = "token-mean",
               denominator: Optional[Number] = None
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO critic loss `0.5 * max((v - R)^2, (v_clipped - R)^2)`, v_clipped = old_values +
    clamp(v - old_values, -clip, clip): the critic cannot move further than `clip` from the
    values the advantages were computed with in one update. clip None or 0: plain 0.5*(v-R)^2.

    metrics: vf_clip_frac (share of unmasked tokens where the clipped error is the larger one),
    value_mean.
    """
    valid = _valid(mask)
    v = torch.where(valid, values.float(), 0.0)
    old = torch.where(valid, old_values.float(), 0.0)
    ret = torch.where(valid, returns.float(), 0.0)
    err = (v - ret) ** 2
    if clip:
        err_clipped = (old + (v - old).clamp(-clip, clip) - ret) ** 2
        took_clip = err_clipped > err
        err = torch.maximum(err, err_clipped)
    else:
        took_clip = torch.zeros_like(valid)
    loss = aggregate(0.5 * err, mask, agg, denominator=denominator)
    with torch.no_grad():
        metrics = {"vf_clip_frac": _masked_mean(took_clip, valid),
                   "value_mean": _masked_mean(v.detach(), valid)}
    return loss, metrics


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (fp32).

    k1 = logp - ref_logp: unbiased but signed and noisy; the usual choice for a KL reward.
    k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, non-negative, low variance; the usual
    choice for a KL loss (GRPO). Mask and aggregate the result like any per-token loss.
    """
    diff = (ref_logp.float() - logp.float()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if kind == "k1":
        return -diff
    if kind == "k3":
        return torch.exp(diff) - diff - 1.0
    raise ValueError(f"kind={kind!r} is not one of k1, k3")


# -- vocab-parallel softmax statistics ---------------------------------------------------------

def _shard(logits: torch.Tensor, tp_group, vocab_size: Optional[int]):
    """(group or None, first global id of this shard, how many of its columns are real ids:
    the others are megatron's padding, always the shard's last ones)."""
    world = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if world == 1 else dist.get_rank(tp_group)
    v_local = logits.size(-1)
    start = rank * v_local
    if vocab_size is not None and not 0 < vocab_size <= v_local * world:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {v_local * world}] (the "
                         f"shards hold {world} x {v_local} columns)")
    real = v_local if vocab_size is None else min(max(vocab_size - start, 0), v_local)
    return (tp_group if world > 1 else None), start, real


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


class _LogProbEntropy(torch.autograd.Function):
    """log softmax(x)[target] and the entropy -sum p log p, over the vocab split across `group`,
    from one softmax pass over the shard's `real` (non-padding) columns; the padding columns are
    never read and get zero gradient. Backward needs no communication: d logp / dx_j =
    onehot_j - p_j and dH/dx_j = -p_j (log p_j + H) on the shard that holds column j. With
    `entropy_grad` False the entropy is a statistic only (not differentiable, nothing saved for
    it); with `entropy` False it is not computed (None)."""

    @staticmethod
    def forward(ctx, x, targets, start, real, group, entropy, entropy_grad):
        v_local, x = x.size(-1), x[..., :real]
        gmax = x.amax(dim=-1) if real else x.new_full(x.shape[:-1], float("-inf"))
        shifted = x - _all_reduce(gmax, group, dist.ReduceOp.MAX).unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)
        local = targets - start
        here = (local >= 0) & (local < real)
        index = local.clamp(0, max(real - 1, 0)).unsqueeze(-1)
        picked = (torch.where(here, shifted.gather(-1, index).squeeze(-1), 0.0) if real
                  else torch.zeros_like(sum_exp))
        log_z = sum_exp.log()
        logp = _all_reduce(picked, group) - log_z
        probs = exp.div_(sum_exp.unsqueeze(-1))
        ent = None
        if entropy:
            ent = log_z - _all_reduce((probs * shifted).sum(dim=-1), group)
        ctx.v_local, ctx.entropy_grad = v_local, entropy and entropy_grad
        if ctx.entropy_grad:
            ctx.save_for_backward(probs, index, here, shifted, log_z, ent)
        else:
            ctx.save_for_backward(probs, index, here)
            if ent is not None:
                ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        probs, index, here = ctx.saved_tensors[:3]
        # the whole shard's gradient in the logits' memory order (the model hands a transposed
        # view), written in place: the padding columns zeroed, no padded copy
        grad_full = _empty_in_order_of(probs, probs.shape[:-1] + (ctx.v_local,))
        grad_full[..., probs.size(-1):].zero_()
        grad_x = grad_full[..., :probs.size(-1)]
        torch.mul(probs, -grad_logp.unsqueeze(-1), out=grad_x)
        if probs.size(-1):
            grad_x.scatter_add_(-1, index, torch.where(here, grad_logp, 0.0).unsqueeze(-1))
        if ctx.entropy_grad and grad_ent is not None:
            shifted, log_z, ent = ctx.saved_tensors[3:]
            log_p = shifted - log_z.unsqueeze(-1)
            grad_x -= probs * (log_p + ent.unsqueeze(-1)) * grad_ent.unsqueeze(-1)
        return grad_full, None, None, None, None, None, None


def _empty_in_order_of(ref: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised dense tensor of `shape` whose dims lie in memory in `ref`'s order
    (outermost = largest stride)."""
    order = sorted(range(ref.dim()), key=lambda d: -ref.stride(d))
    out = ref.new_empty([shape[d] for d in order])
    return out.permute([order.index(d) for d in range(ref.dim())])


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 here (greedy rollouts record "
                         "log-probs at temperature 1)")
    x = logits.float()
    return x / temperature if temperature != 1.0 else x


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None,
                         vocab_size: Optional[int] = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[targets], exact under vocab parallelism (fp32).

    logits `[..., v_local]` is this rank's shard: rank r of `tp_group` holds global columns
    [r*v_local, (r+1)*v_local), as megatron's output layer with parallel_output=True gives.
    targets `[...]` are global ids on any shard. `vocab_size` excludes megatron's padding
    columns (>= vocab_size) from the softmax; use the same value and temperature as the rollout,
    or the first PPO ratio is not 1. Two all-reduces (max, sum of exp) and one for the picked
    logit in forward; none in backward. Targets outside [0, vocab) give meaningless values: mask
    them. tp_group None (or of size 1): the logits are the whole vocab.
    """
    return logprobs_and_entropy(logits, targets, tp_group=tp_group, vocab_size=vocab_size,
                                temperature=temperature, entropy=False)[0]


def entropy_from_logits(logits: torch.Tensor, *, tp_group=None, vocab_size: Optional[int] = None,
                        temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position `[...]`, exact under vocab
    parallelism (fp32, differentiable). Shard layout, `vocab_size` and `tp_group` as in
    `logprobs_from_logits`."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, targets, tp_group=tp_group, vocab_size=vocab_size,
                                temperature=temperature)[1]


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None,
                         vocab_size: Optional[int] = None, temperature: float = 1.0,
                         entropy: bool = True, entropy_grad: bool = True):
    """(`logprobs_from_logits`, `entropy_from_logits`) from one softmax over the logits: what
    the policy loss needs, at the cost of one. `entropy_grad=False` (no entropy bonus) returns
    the entropy as a statistic without a gradient, and keeps nothing for its backward."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits {tuple(logits.shape)} "
                         "without the vocab dim")
    group, start, real = _shard(logits, tp_group, vocab_size)
    return _LogProbEntropy.apply(_tempered(logits, temperature), targets, start, real, group,
                                 entropy, entropy_grad)
