"""The RL section of the config (`rl:` in the Hydra tree): what the GRPO/PPO loop needs, with its
choices and bounds on the fields and `check_rl` for the rules that tie fields together."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_ext.config.fields import ConfigError, bounded, one_of

# The rewards a config may name: megatron_ext.rl.rewards registers a function under each
# (@register_reward). A new reward is registered there and named here, so that the launcher
# checks rl.rewards without importing the rewards (and torch).
REWARD_NAMES = ("task_correct", "format", "math")


@dataclass
class RewardSpec:
    # a registered reward (megatron_ext.rl.rewards), or a user function `module:function`
    name: str = "task_correct"
    weight: float = 1.0  # its weight in the summed reward


@dataclass
class RLConfig:
    init_checkpoint: Optional[str] = None  # SFT checkpoint (<run>/checkpoints/step_N) to start from
    # algorithm and sampling
    algorithm: str = one_of("grpo", "ppo")  # grpo: group baseline, no critic; ppo: critic + GAE
    group_size: int = 8  # responses sampled per prompt (GRPO needs >= 2)
    prompts_per_step: int = bounded(16, at_least=1)  # prompt groups per rollout batch (per DP rank)
    max_new_tokens: int = bounded(64, at_least=1)  # response length limit in tokens
    temperature: float = bounded(1.0, at_least=0)  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling mass (1: off)
    stop: List[str] = field(default_factory=list)  # stop strings besides EOS
    # memory bounds: sequences the generation engine holds at once (rollouts and held-out eval
    # go through that many slots in turn), and the reference's weights on the host (GPU)
    rollout_batch: int = bounded(128, at_least=1, what="sequence slots of rollout/eval generation")
    engine: str = one_of("auto", "ours", "megatron")  # rollout/eval generation (as generate.engine)
    cuda_graphs: str = one_of("auto", "true", "false", "True", "False")  # as generate.cuda_graphs
    offload_reference: bool = False  # stream the reference's weights to the GPU layer by layer
    # policy loss
    eps_low: float = bounded(0.2, at_least=0)  # ratio clip below: 1 - eps_low
    eps_high: float = bounded(0.28, at_least=0)  # ratio clip above: 1 + eps_high (DAPO clip-higher)
    dual_clip: float = 0.0  # dual-clip c > 1 caps negative-advantage loss at c*|A| (0: off)
    # how token losses make the loss: mean over tokens, or over sequences of token sums / means
    loss_agg: str = one_of("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
    entropy_coef: float = bounded(0.0, at_least=0)  # weight of the entropy bonus (subtracted)
    kl_coef: float = bounded(0.0, at_least=0)  # weight of the KL to the reference (0: no reference)
    kl_estimator: str = one_of("k1", "k3", default="k3")  # per-token KL estimator
    kl_mode: str = one_of("loss", "reward")  # KL as a loss term, or subtracted from token rewards
    normalize_std: bool = True  # GRPO: divide centred rewards by the group std
    # difficulty filter (dynamic sampling)
    band_low: float = 0.0  # keep prompt groups with pass rate >= band_low
    band_high: float = 1.0  # ... and <= band_high
    max_refill_rounds: int = bounded(3, at_least=1)  # rollout rounds to refill a filtered batch
    # reuse of each rollout batch
    ppo_epochs: int = bounded(1, at_least=1)  # passes over each rollout batch
    mini_batches: int = bounded(1, at_least=1)  # optimizer steps per pass
    # drop rows more than this many updates old (null: off)
    max_staleness: Optional[int] = bounded(None, at_least=0)
    # PPO critic
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    value_clip: float = bounded(0.2, at_least=0)  # value-loss clip around the old values (0: off)
    critic_lr: float = 1.0e-5  # critic learning rate
    # rewards
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # summed rewards
    # regression guard on the held-out accuracy
    eval_interval: int = bounded(0, at_least=0)  # steps between guard evals (0: off)
    margin: float = bounded(0.05, at_least=0)  # allowed drop of held-out accuracy below the best
    action: str = one_of("halve_lr", "stop")  # what the guard does when the drop exceeds margin
    # eval: pass@k from n samples per held-out problem at rl.temperature (1: greedy pass@1 only)
    eval_k: int = bounded(1, at_least=1, what="the k of pass@k")
    eval_samples: Optional[int] = bounded(None, at_least=1, what="samples per problem")  # null: eval_k


def check_rl(rl: RLConfig) -> None:
    """Raise ConfigError for the first rule between rl fields that `rl` breaks (choices and
    bounds are checked on the fields, by config.fields.check_fields)."""
    if rl.group_size < (2 if rl.algorithm == "grpo" else 1):
        raise ConfigError(f"rl.group_size={rl.group_size} gives GRPO no baseline; use >= 2 "
                          "or rl.algorithm=ppo")
    if rl.group_size % rl.mini_batches:
        raise ConfigError(f"rl.mini_batches={rl.mini_batches} does not divide rl.group_size="
                          f"{rl.group_size}; a filtered batch holds whole groups, so make "
                          "mini_batches a divisor of group_size")
    if rl.temperature == 0 and rl.algorithm == "grpo":
        raise ConfigError("rl.temperature=0 samples every response of a group alike, so GRPO "
                          "sees no reward differences; use a temperature > 0 (e.g. 1.0)")
    if rl.eps_low >= 1:
        raise ConfigError(f"rl.eps_low={rl.eps_low} must be < 1 (the lower clip is 1 - eps_low)")
    if not 0 < rl.top_p <= 1:
        raise ConfigError(f"rl.top_p={rl.top_p} must be in (0, 1]")
    if rl.dual_clip and rl.dual_clip <= 1:
        raise ConfigError(f"rl.dual_clip={rl.dual_clip} must be > 1 (or 0 to turn it off)")
    if not 0 <= rl.band_low <= rl.band_high <= 1:
        raise ConfigError(f"need 0 <= rl.band_low <= rl.band_high <= 1 (got {rl.band_low}, "
                          f"{rl.band_high})")
    if not (0 < rl.gamma <= 1 and 0 <= rl.lam <= 1):
        raise ConfigError(f"need 0 < rl.gamma <= 1 and 0 <= rl.lam <= 1 (got gamma={rl.gamma}, "
                          f"lam={rl.lam})")
    if rl.critic_lr <= 0 and rl.algorithm == "ppo":
        raise ConfigError(f"rl.critic_lr={rl.critic_lr} must be > 0 for rl.algorithm=ppo")
    samples = rl.eval_samples if rl.eval_samples is not None else rl.eval_k
    if samples < rl.eval_k:
        raise ConfigError(f"rl.eval_samples={rl.eval_samples} is below rl.eval_k={rl.eval_k}: "
                          "pass@k needs at least k samples per problem; set rl.eval_samples >= "
                          "rl.eval_k (or null, which takes rl.eval_k)")
    if samples > 1 and rl.temperature == 0:
        raise ConfigError(f"rl.eval_k={rl.eval_k} (rl.eval_samples={rl.eval_samples}) samples "
                          "every held-out problem at rl.temperature=0, which draws the same "
                          "response each time; use rl.temperature > 0 or rl.eval_k=1 (greedy)")
    if any(s == "" for s in rl.stop):
        raise ConfigError("rl.stop holds an empty string, which would stop at once; remove it")
    if rl.offload_reference and rl.kl_coef == 0:
        raise ConfigError("rl.offload_reference=true, but rl.kl_coef=0 builds no reference model "
                          "to offload; set rl.kl_coef > 0 or drop rl.offload_reference")
    if not rl.rewards:
        raise ConfigError("rl.rewards is empty; give at least one {name, weight}")
    for i, spec in enumerate(rl.rewards):
        check_reward_name(f"rl.rewards[{i}].name", spec.name)
        if not math.isfinite(spec.weight):
            raise ConfigError(f"rl.rewards[{i}].weight={spec.weight} must be finite")


def check_reward_name(key: str, name: str) -> None:
    """A registered reward, or `module:function` whose module can be found (found, not
    imported: config/ is the leaf; the recipe imports it)."""
    if ":" not in name:
        if name not in REWARD_NAMES:
            raise ConfigError(f"{key}={name!r} is not one of {', '.join(REWARD_NAMES)}; pick one "
                              "of these, or name your own function as module:function")
        return
    module, _, attr = name.partition(":")
    try:
        found = bool(module and attr) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that does not import
        found = False
    if not found:
        raise ConfigError(f"{key}={name!r}: module {module!r} is not importable (or no function "
                          "is named after the colon); give module:function of a module on "
                          "PYTHONPATH")
