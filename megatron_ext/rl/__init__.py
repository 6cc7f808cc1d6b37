"""RL fine-tuning (GRPO/PPO): advantages, losses, difficulty filtering, a trajectory buffer,
rewards and KV-cached rollouts, and the loop that runs them (`megatron_ext.rl.trainer`, chosen
by `stage=rl`). Importing the package does not import megatron; `megatron_ext.models.generate` and
the trainer do."""
from megatron_ext.rl.advantages import gae, grpo_advantages, whiten
from megatron_ext.rl.filtering import difficulty_filter
from megatron_ext.rl.losses import policy_loss

__all__ = ["grpo_advantages", "gae", "whiten", "policy_loss", "difficulty_filter"]
