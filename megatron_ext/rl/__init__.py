"""RL fine-tuning building blocks (GRPO/PPO): advantages, losses, difficulty filtering, a
trajectory buffer, rewards and KV-cached rollouts. Importing the package does not import
megatron; `megatron_ext.rl.rollout` does, when generation is first called."""
from megatron_ext.rl.advantages import gae, grpo_advantages, whiten
from megatron_ext.rl.filtering import difficulty_filter
from megatron_ext.rl.losses import policy_loss

__all__ = ["grpo_advantages", "gae", "whiten", "policy_loss", "difficulty_filter"]
