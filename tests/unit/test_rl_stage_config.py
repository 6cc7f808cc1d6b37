"""stage=rl configs: `rl=grpo|ppo` select their groups, the RL rules run, and every error names
the field to change."""
import pytest

from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import ConfigError, validate


def _rl(tmp_path, *overrides):
    return ["stage=rl", f"rl.init_checkpoint={tmp_path}", *overrides]


def test_rl_groups_select_the_algorithm(tmp_path):
    cfg = compose_config(_rl(tmp_path, "rl=ppo"))
    assert cfg.rl.algorithm == "ppo" and cfg.rl.critic_lr > 0
    assert validate(cfg, 1).world_size == 1
    cfg = compose_config(_rl(tmp_path))  # rl=grpo is the default group
    assert cfg.rl.algorithm == "grpo" and cfg.rl.group_size == 8
    assert validate(compose_config(_rl(tmp_path, "parallel.tp=2", "parallel.pp=2")), 4).dp == 1
    # an SFT run carries the rl section without checking it
    validate(compose_config(["rl.group_size=1"]), 1)


@pytest.mark.parametrize("overrides, message", [
    (["stage=rl"], "rl.init_checkpoint=None is not a checkpoint folder"),
    (["stage=rl", "rl.init_checkpoint=/no/such/dir"], "rl.init_checkpoint='/no/such/dir'"),
    (["rl.group_size=1"], "rl.group_size=1 gives GRPO no baseline"),
    (["rl.mini_batches=3"], "rl.mini_batches=3 does not divide rl.group_size=8"),
    (["rl.temperature=0"], "rl.temperature=0 samples every response of a group alike"),
    (["rl.algorithm=dpo"], "rl.algorithm='dpo' is not one of grpo, ppo"),
    (["rl.band_low=0.9", "rl.band_high=0.1"], "need 0 <= rl.band_low <= rl.band_high <= 1"),
    (["rl=ppo", "rl.critic_lr=0"], "rl.critic_lr=0.0 must be > 0 for rl.algorithm=ppo"),
    (["rl.rewards=[{name: nope, weight: 1.0}]"],
     "rl.rewards[0].name='nope' is not one of task_correct, format"),
    (["rl.rewards=[]"], "rl.rewards is empty"),
    (["data=jsonl", "data.path=x.jsonl"], "data.valid_path is unset; stage=rl evaluates"),
    (["data=indexed", "data.blend=[x]"], "data.source=indexed: stage=rl needs prompts"),
    (["parallel.cp=2"], "parallel.cp=2: stage=rl generates one token per step"),
    # refused before any process starts (it used to raise NotImplementedError at the first
    # rollout), even where TE/apex norms would allow sequence parallelism for SFT
    (["parallel.tp=2", "parallel.sequence_parallel=true"],
     "parallel.sequence_parallel=true: stage=rl generates one token per step, which sequence "
     "parallelism cannot split; set parallel.sequence_parallel=false"),
])
def test_rl_errors_name_the_field(tmp_path, overrides, message):
    if overrides[0] != "stage=rl":
        overrides = _rl(tmp_path, *overrides)
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), 2, have_fused_norms=True)
    assert message in str(err.value)


def test_sequence_parallel_at_tp1_is_off_and_passes(tmp_path):
    """At tp=1 the model builds without sequence parallelism, so nothing refuses it."""
    validate(compose_config(_rl(tmp_path, "parallel.sequence_parallel=true")), 1)
