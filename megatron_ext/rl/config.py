"""The RL section of the config (`rl:` in the Hydra tree): what the GRPO/PPO loop needs.

`check_rl_config` raises before any process group exists, naming the field and the fix, so a
bad RL setting fails as early as a bad model shape does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class RewardSpec:
    name: str = "task_correct"  # a registered reward (megatron_ext.rl.rewards)
    weight: float = 1.0  # its weight in the summed reward


@dataclass
class RLConfig:
    init_checkpoint: Optional[str] = None  # SFT checkpoint (<run>/checkpoints/step_N) to start from
    # algorithm and sampling
    algorithm: str = "grpo"  # grpo (group baseline, no critic) | ppo (critic + GAE)
    group_size: int = 8  # responses sampled per prompt (GRPO needs >= 2)
    prompts_per_step: int = 16  # prompt groups in one rollout batch (per DP rank)
    max_new_tokens: int = 64  # response length limit in tokens
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling mass (1: off)
    stop: List[str] = field(default_factory=list)  # stop strings besides EOS
    # policy loss
    eps_low: float = 0.2  # ratio clip below: 1 - eps_low
    eps_high: float = 0.28  # ratio clip above: 1 + eps_high (DAPO clip-higher)
    dual_clip: float = 0.0  # dual-clip c > 1 caps negative-advantage loss at c*|A| (0: off)
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    entropy_coef: float = 0.0  # weight of the entropy bonus (subtracted from the loss)
    kl_coef: float = 0.0  # weight of the KL to the reference policy (0: no reference model)
    kl_estimator: str = "k3"  # k1 | k3 (per-token KL estimator)
    kl_mode: str = "loss"  # loss (KL term in the loss) | reward (subtracted from token rewards)
    normalize_std: bool = True  # GRPO: divide centred rewards by the group std
    # difficulty filter (dynamic sampling)
    band_low: float = 0.0  # keep prompt groups with pass rate >= band_low
    band_high: float = 1.0  # ... and <= band_high
    max_refill_rounds: int = 3  # rollout rounds to refill a batch after filtering
    # reuse of each rollout batch
    ppo_epochs: int = 1  # passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    max_staleness: Optional[int] = None  # drop rows more than this many updates old (null: off)
    # PPO critic
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    value_clip: float = 0.2  # value-loss clip around the old values (0: off)
    critic_lr: float = 1.0e-5  # critic learning rate
    # rewards
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # summed rewards
    # regression guard on the held-out accuracy
    eval_interval: int = 0  # steps between guard evals (0: off)
    margin: float = 0.05  # allowed drop of held-out accuracy below the best seen
    action: str = "halve_lr"  # halve_lr | stop when the drop exceeds margin


_CHOICES = {
    "algorithm": ("grpo", "ppo"),
    "loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"),
    "kl_estimator": ("k1", "k3"),
    "kl_mode": ("loss", "reward"),
    "action": ("halve_lr", "stop"),
}


def check_rl_config(rl: RLConfig) -> None:
    """Raise ValueError for the first rule `rl` breaks; the message names `rl.<field>`."""
    for key, choices in _CHOICES.items():
        if getattr(rl, key) not in choices:
            raise ValueError(f"rl.{key}={getattr(rl, key)!r} is not one of {', '.join(choices)}")
    for key in ("prompts_per_step", "max_new_tokens", "max_refill_rounds", "ppo_epochs",
                "mini_batches"):
        if getattr(rl, key) < 1:
            raise ValueError(f"rl.{key}={getattr(rl, key)} must be >= 1")
    if rl.group_size < (2 if rl.algorithm == "grpo" else 1):
        raise ValueError(f"rl.group_size={rl.group_size} gives GRPO no baseline; use >= 2 "
                         "or rl.algorithm=ppo")
    if rl.group_size % rl.mini_batches:
        raise ValueError(f"rl.mini_batches={rl.mini_batches} does not divide rl.group_size="
                         f"{rl.group_size}; a filtered batch holds whole groups, so make "
                         "mini_batches a divisor of group_size")
    if rl.temperature == 0 and rl.algorithm == "grpo":
        raise ValueError("rl.temperature=0 samples every response of a group alike, so GRPO "
                         "sees no reward differences; use a temperature > 0 (e.g. 1.0)")
    if rl.max_staleness is not None and rl.max_staleness < 0:
        raise ValueError(f"rl.max_staleness={rl.max_staleness} must be >= 0 or null (no limit)")
    for key in ("eval_interval", "temperature", "entropy_coef", "kl_coef",
                "value_clip", "eps_low", "eps_high"):
        if getattr(rl, key) < 0:
            raise ValueError(f"rl.{key}={getattr(rl, key)} must be >= 0")
    if rl.eps_low >= 1:
        raise ValueError(f"rl.eps_low={rl.eps_low} must be < 1 (the lower clip is 1 - eps_low)")
    if not 0 < rl.top_p <= 1:
        raise ValueError(f"rl.top_p={rl.top_p} must be in (0, 1]")
    if rl.dual_clip and rl.dual_clip <= 1:
        raise ValueError(f"rl.dual_clip={rl.dual_clip} must be > 1 (or 0 to turn it off)")
    if not 0 <= rl.band_low <= rl.band_high <= 1:
        raise ValueError(f"need 0 <= rl.band_low <= rl.band_high <= 1 (got {rl.band_low}, "
                         f"{rl.band_high})")
    if not (0 < rl.gamma <= 1 and 0 <= rl.lam <= 1):
        raise ValueError(f"need 0 < rl.gamma <= 1 and 0 <= rl.lam <= 1 (got gamma={rl.gamma}, "
                         f"lam={rl.lam})")
    if rl.critic_lr <= 0 and rl.algorithm == "ppo":
        raise ValueError(f"rl.critic_lr={rl.critic_lr} must be > 0 for rl.algorithm=ppo")
    if any(s == "" for s in rl.stop):
        raise ValueError("rl.stop holds an empty string, which would stop at once; remove it")
    if not rl.rewards:
        raise ValueError("rl.rewards is empty; give at least one {name, weight}")
    from megatron_ext.rl.rewards import get_reward
    for i, spec in enumerate(rl.rewards):
        try:
            get_reward(spec.name)
        except KeyError as err:
            raise ValueError(f"rl.rewards[{i}].name: {err.args[0]}") from None
        if not math.isfinite(spec.weight):
            raise ValueError(f"rl.rewards[{i}].weight={spec.weight} must be finite")
    if rl.margin < 0:
        raise ValueError(f"rl.margin={rl.margin} must be >= 0")
