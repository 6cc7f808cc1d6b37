"""RL algorithms by name (`rl.algorithm`): how a batch's rewards become per-token advantages,
and which model units the algorithm needs besides the policy. Pure tensor functions over the
rows (`[n, t]` tensors aligned with the model input; see rl/rows.py):

    fn(rows, rewards [n], group_size, reward_kl [n, t] | None, values [n, t] | None, rl,
       dp_group) -> {statistic: local sum}

writing `rows["advantages"]` (and what the algorithm's losses read, e.g. PPO's `old_values` and
`returns`). The statistics are sums over this rank's rows, to be summed over the job."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import torch

from megatron_ext.rl.advantages import gae, grpo_advantages, whiten
from megatron_ext.rl.rows import last_token_rewards
from megatron_ext.training import collectives


@dataclasses.dataclass(frozen=True)
class Algorithm:
    name: str
    advantages: Callable
    uses_critic: bool  # PPO: a value model trained beside the policy


ALGORITHMS: Dict[str, Algorithm] = {}


def register_algorithm(name: str, *, uses_critic: bool = False):
    def add(fn: Callable) -> Callable:
        ALGORITHMS[name] = Algorithm(name, fn, uses_critic)
        return fn
    return add


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"rl.algorithm={name!r} is not one of {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


@register_algorithm("grpo")
def grpo(rows, rewards, group_size, reward_kl, values, rl, dp_group) -> Dict[str, float]:
    """The group's mean reward is the baseline (optionally divided by the group's std); every
    token of a response gets its sequence advantage. A reward-mode KL comes off the reward."""
    if reward_kl is not None:
        rewards = rewards - rl.kl_coef * reward_kl.sum(1)
    adv = (grpo_advantages(rewards.view(-1, group_size), normalize_std=rl.normalize_std).flatten()
           if rewards.numel() else rewards)
    rows["advantages"] = adv[:, None] * rows["mask"]
    return {}


@register_algorithm("ppo", uses_critic=True)
def ppo(rows, rewards, group_size, reward_kl, values, rl, dp_group) -> Dict[str, float]:
    """The sequence reward on the last response token (minus a reward-mode KL per token), GAE
    against the critic's values, advantages whitened over the whole DP batch."""
    mask = rows["mask"]
    values = values * mask
    token_rewards = last_token_rewards(rewards, mask)
    if reward_kl is not None:
        token_rewards = token_rewards - rl.kl_coef * reward_kl
    adv, returns = gae(token_rewards, values, mask, rl.gamma, rl.lam)
    if collectives.reduce_floats([float(mask.sum())], dp_group)[0] > 0:
        adv = whiten(adv, mask, group=dp_group)
    rows.update(advantages=adv, old_values=values, returns=returns)
    residual = (returns - values) * mask
    return {"ev_n": float(mask.sum()), "ev_ret": float(returns.sum()),
            "ev_ret_sq": float((returns ** 2).sum()), "ev_res": float(residual.sum()),
            "ev_res_sq": float((residual ** 2).sum())}


def explained_variance(s: Dict[str, float]) -> float:
    """1 - Var(returns - values) / Var(returns) over the job, from ppo's sums."""
    var = lambda total, sq: sq / s["ev_n"] - (total / s["ev_n"]) ** 2
    ret_var = var(s["ev_ret"], s["ev_ret_sq"])
    return 1.0 - var(s["ev_res"], s["ev_res_sq"]) / ret_var if ret_var > 0 else 0.0
