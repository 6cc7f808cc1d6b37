"""swiglu against silu(a) * b in float64 on every available backend, the recompute contract
(only x is saved), and the megatron MLP hook."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.ops import swiglu

SHAPES = [(4, 6), (3, 5, 10), (2, 3, 4, 130), (1, 2)]


def formula(x):
    a, b = x.chunk(2, dim=-1)
    return F.silu(a) * b


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_and_grads_float64(backend, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape[:-1], shape[-1] // 2, dtype=torch.float64)
    y = swiglu(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = formula(x)
    (ref_dx,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_float64_formula(backend, dtype):
    x = (torch.randn(7, 64) * 3).to(dtype).requires_grad_()
    dy = torch.randn(7, 32).to(dtype)
    y = swiglu(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    ref = formula(x64)
    (ref_dx,) = torch.autograd.grad(ref, x64, dy.double())
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert y.dtype == dx.dtype == dtype
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(dx.double(), ref_dx, rtol=tol, atol=tol)


def test_saves_only_x(backend):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(x).sum().backward()
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_odd_last_dimension_names_the_shape():
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        swiglu(torch.randn(2, 5))


@pytest.fixture
def model_parallel_world_of_one():
    """A one-process gloo world with megatron's parallel state, torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    from megatron.core import parallel_state

    store = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_megatron_mlp_hook_matches_unfused_mlp(model_parallel_world_of_one):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.models.fused_swiglu import SwiGLUActivation, apply_fused_swiglu

    config = TransformerConfig(num_layers=1, hidden_size=16, ffn_hidden_size=24,
                               num_attention_heads=2, gated_linear_unit=True,
                               activation_func=F.silu, bias_activation_fusion=False,
                               add_bias_linear=True, use_cpu_initialization=True)
    spec = get_gpt_layer_local_spec()
    fused_config, fused_spec = apply_fused_swiglu(config, spec)
    assert fused_config.use_te_activation_func and not config.use_te_activation_func
    assert spec.submodules.mlp.submodules.activation_func is None  # input left unchanged

    torch.manual_seed(0)
    plain = build_module(spec.submodules.mlp, config=config)
    fused = build_module(fused_spec.submodules.mlp, config=fused_config)
    fused.load_state_dict(plain.state_dict())  # same parameters, same checkpoint layout
    assert isinstance(fused.activation_func, SwiGLUActivation)

    x = torch.randn(5, 2, 16)
    out_plain, _ = plain(x)
    out_fused, _ = fused(x)
    torch.testing.assert_close(out_fused, out_plain)
    out_plain.sum().backward()
    out_fused.sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_megatron_hook_refuses_a_non_swiglu_config():
    from types import SimpleNamespace

    from megatron_ext.models.fused_swiglu import apply_fused_swiglu

    config = SimpleNamespace(gated_linear_unit=False, activation_func=F.gelu,
                             glu_linear_offset=0.0, activation_func_clamp_value=None,
                             num_moe_experts=None, activation_func_fp8_input_store=False)
    with pytest.raises(ValueError, match="gated_linear_unit must be True.*F.silu"):
        apply_fused_swiglu(config, None)
