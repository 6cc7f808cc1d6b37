"""The RL config section: typed defaults that pass the check, errors that name the field, and
reward names that the rewards registry serves."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from megatron_ext.config.fields import ConfigError, check_fields
from megatron_ext.config.rl import REWARD_NAMES, RewardSpec, RLConfig, check_rl


def _check(rl):
    check_fields(rl, "rl.")
    check_rl(rl)


def test_rl_config_defaults_pass_and_errors_name_the_field():
    rl = RLConfig()
    _check(rl)
    # usable as a Hydra structured config: overrides parse into the typed fields
    node = OmegaConf.merge(OmegaConf.structured(RLConfig),
                           OmegaConf.from_dotlist(["max_staleness=2", "rewards=[{name: format}]"]))
    parsed = OmegaConf.to_object(node)
    assert parsed.max_staleness == 2 and parsed.rewards == [RewardSpec(name="format")]
    for change, match in [({"algorithm": "dpo"}, "rl.algorithm='dpo'"),
                          ({"group_size": 1}, "rl.group_size=1"),
                          ({"band_low": 0.8, "band_high": 0.2}, "rl.band_low"),
                          ({"dual_clip": 0.5}, "rl.dual_clip=0.5"),
                          ({"max_staleness": -1}, "rl.max_staleness=-1"),
                          ({"rewards": [RewardSpec(name="nope")]}, r"rl.rewards\[0\].name"),
                          ({"rewards": [RewardSpec(weight=float("inf"))]},
                           r"rl.rewards\[0\].weight=inf must be finite")]:
        with pytest.raises(ConfigError, match=match):
            _check(dataclasses.replace(rl, **change))


def test_reward_names_a_config_may_give_are_the_registered_ones():
    """config.rl.REWARD_NAMES is what validation accepts: megatron_ext.rl.rewards registers a
    function under each name, and no other of its own."""
    from megatron_ext.rl import rewards
    own = {name for name, fn in rewards._REGISTRY.items() if fn.__module__ == rewards.__name__}
    assert own == set(REWARD_NAMES)
