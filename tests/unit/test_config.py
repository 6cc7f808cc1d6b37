"""Config composition and validation: every rule names its fields, typos fail early."""
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import ConfigError, validate
from parallel.topology import LayoutError


def _check(overrides, world_size=1):
    return validate(compose_config(overrides), world_size)


def test_defaults_compose_and_validate():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.stage, cfg.parallel.tp) == ("tiny", "sft", 1)
    assert _check(["parallel.tp=2", "parallel.pp=2"], 8).dp == 2


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp*parallel.pp*parallel.cp = 2*1*1 = 2"),
    (["parallel.tp=8", "model.num_attention_heads=12", "model.num_query_groups=4",
      "model.hidden_size=96"], 8, "model.num_attention_heads=12 is not divisible by parallel.tp=8"),
    (["parallel.tp=4", "model.num_attention_heads=4", "model.num_query_groups=2"], 4,
     "model.num_query_groups=2 is not divisible by parallel.tp=4"),
    (["parallel.pp=2", "parallel.vpp=2", "model.num_layers=6"], 2,
     "model.num_layers=6 is not divisible by parallel.pp*vpp = 2*2 = 4"),
    (["parallel.pp=3"], 3, "model.num_layers=4 is not divisible by parallel.pp*vpp = 3*1 = 3"),
    (["parallel.cp=2", "train.seq_len=30"], 2, "train.seq_len=30 is not divisible by 2*parallel.cp = 4"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
     "train.global_batch_size=10 is not divisible by train.micro_batch_size*dp = 4*1 = 4"),
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 3,
     "train.global_batch_size=8 is not divisible by train.micro_batch_size*dp = 2*3 = 6"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 2,
     "parallel.sequence_parallel=true needs TransformerEngine or NVIDIA apex"),
    (["parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp >= 2"),
])
def test_layout_rules(overrides, world, message):
    with pytest.raises(LayoutError) as err:
        _check(overrides, world)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["stage=finetune"], "stage='finetune' is not one of pretrain, sft, rl"),
    (["train.recompute=some"], "train.recompute='some' is not one of none, selective, full"),
    (["model.num_attention_heads=6", "model.num_query_groups=4", "model.hidden_size=96"],
     "model.num_attention_heads=6 is not divisible by model.num_query_groups=4"),
    (["model.hidden_size=66"], "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
    (["train.seq_len=128", "model.max_position_embeddings=64"],
     "train.seq_len=128 exceeds model.max_position_embeddings=64"),
    (["train.min_lr=1.0", "train.lr=0.1"], "need 0 <= train.min_lr <= train.lr"),
    (["train.steps=0"], "train.steps=0 must be >= 1"),
])
def test_value_rules(overrides, message):
    with pytest.raises(ConfigError) as err:
        _check(overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("override, key", [("parallel.tpp=2", "parallel.tpp"),
                                           ("train.stepz=3", "train.stepz"),
                                           ("parallel.tp=two", "parallel.tp")])
def test_override_typo_is_refused(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert key in str(err.value)


def test_typo_fails_before_any_process_starts(tmp_path):
    """The launcher validates first: exit 2 with the key named, no run directory made."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "local", "--nproc", "2", "--", "parallel.tpp=2",
         f"run.dir={run_dir}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: Could not override 'parallel.tpp'" in proc.stderr
    assert not run_dir.exists()
