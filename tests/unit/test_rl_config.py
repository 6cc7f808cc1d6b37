"""The RL config section: typed defaults that pass the check, errors that name the field."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from megatron_ext.rl.config import RewardSpec, RLConfig, check_rl_config


def test_rl_config_defaults_pass_and_errors_name_the_field():
    rl = RLConfig()
    check_rl_config(rl)
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
                          ({"rewards": [RewardSpec(name="nope")]}, r"rl.rewards\[0\].name")]:
        with pytest.raises(ValueError, match=match):
            check_rl_config(dataclasses.replace(rl, **change))
