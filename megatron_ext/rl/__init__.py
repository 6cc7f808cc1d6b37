"""RL fine-tuning (GRPO/PPO): advantages, losses, difficulty filtering, a trajectory buffer,
rewards, and the recipe that runs them on the shared engine (`megatron_ext.rl.recipe`, chosen
by `stage=rl`). Importing the package does not import megatron; the recipe does."""
from megatron_ext.rl.advantages import gae, grpo_advantages, whiten
from megatron_ext.rl.filtering import difficulty_filter
from megatron_ext.rl.losses import policy_loss

__all__ = ["grpo_advantages", "gae", "whiten", "policy_loss", "difficulty_filter"]
