"""model.fused_loss / model.fused_swiglu = auto | true | false: the one resolver's table, the GPU
rows with the CUDA extension's presence injected, and the config rule that refuses other values."""
import pytest

from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import ConfigError, validate
from megatron_ext.ops import FusedConfigError, available_backends, resolve_fused
from megatron_ext.ops._backend import BUILD_COMMAND

KEYS = ("fused_loss", "fused_swiglu")
MEGATRON = {"fused_loss": "vocab-parallel cross-entropy", "fused_swiglu": "megatron's own SwiGLU"}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("setting, use", [
    ("auto", True), ("true", True), ("True", True), (True, True),
    ("false", False), ("False", False), (False, False)])
def test_cpu_auto_and_true_use_our_kernels(key, setting, use):
    choice = resolve_fused(key, setting, "cpu")
    assert choice.use is use and choice.notice == ""
    if use:  # the C++ build serves here (the kernel tests require it)
        assert "cpp" in available_backends() and "C++ kernels" in choice.reason


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("setting", ["auto", "true", "True", True])
def test_gpu_with_the_cuda_build_uses_our_kernels(key, setting):
    choice = resolve_fused(key, setting, "cuda", cuda_built=True)
    assert choice.use and "CUDA kernels" in choice.reason and choice.notice == ""


@pytest.mark.parametrize("key", KEYS)
def test_gpu_without_the_cuda_build_auto_uses_megatron_and_says_so(key):
    choice = resolve_fused(key, "auto", "cuda", cuda_built=False)
    assert choice.use is False
    assert MEGATRON[key] in choice.notice and f"model.{key}=auto" in choice.notice
    assert BUILD_COMMAND in choice.notice


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("setting", ["true", "True", True])
def test_gpu_without_the_cuda_build_true_is_a_config_error(key, setting):
    with pytest.raises(FusedConfigError) as err:
        resolve_fused(key, setting, "cuda", cuda_built=False)
    message = str(err.value)
    assert f"model.{key}=true" in message and BUILD_COMMAND in message
    assert f"model.{key}=auto" in message  # the other way out


@pytest.mark.parametrize("cuda_built", [True, False])
def test_false_is_megatron_everywhere_without_a_notice(cuda_built):
    for key in KEYS:
        choice = resolve_fused(key, "false", "cuda", cuda_built=cuda_built)
        assert choice.use is False and choice.notice == "" and MEGATRON[key] in choice.reason


def test_an_unknown_setting_names_the_key_and_the_choices():
    with pytest.raises(FusedConfigError, match=r"model.fused_loss='yes' is not one of auto, "
                                               r"true, false"):
        resolve_fused("fused_loss", "yes", "cpu")


def test_the_config_takes_auto_true_false_and_refuses_the_rest():
    assert compose_config([]).model.fused_loss == "auto"
    for value in ("auto", "true", "false"):
        cfg = compose_config([f"model.fused_loss={value}", f"model.fused_swiglu={value}"])
        validate(cfg, 1)
        assert resolve_fused("fused_loss", cfg.model.fused_loss, "cpu").use is (value != "false")
    with pytest.raises(ConfigError, match=r"model.fused_swiglu='on' is not one of auto, true"):
        validate(compose_config(["model.fused_swiglu=on"]), 1)


def test_fused_true_on_a_gpu_without_the_cuda_build_is_a_config_error(monkeypatch, capsys):
    """The entry point refuses it before any process group exists, exit 2, one line."""
    import torch

    from megatron_ext.config.load import compose_config
    from megatron_ext.ops import _backend
    from megatron_ext.train import refuse_unserved_fused_ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(_backend._KERNELS, "cuda", None)
    refuse_unserved_fused_ops(compose_config(["model.fused_loss=auto"]))  # auto falls back
    with pytest.raises(SystemExit) as stop:
        refuse_unserved_fused_ops(compose_config(["model.fused_swiglu=true"]))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: model.fused_swiglu=true on a GPU")
