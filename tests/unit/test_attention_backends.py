"""Core-attention backends: SDPA against megatron's DotProductAttention, the ring block kernel on
torch's SDPA ops against the PyTorch reference, the backend choice and its errors."""
import functools

import pytest
import torch

from megatron_ext.models.attention import SDPACoreAttention, resolve_backend
from parallel.attention_block import attention_block_backward, attention_block_forward, merge


def _config(heads, groups, hn, dtype=torch.float32, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=heads * hn, num_attention_heads=heads,
        num_query_groups=groups, attention_dropout=0.0, hidden_dropout=0.0,
        use_cpu_initialization=True, params_dtype=dtype, bf16=dtype == torch.bfloat16, **extra)


def _qkv(sq, sk, b, heads, groups, hn, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((sq, b, heads, hn), (sk, b, groups, hn), (sk, b, groups, hn))
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _run(module, q, k, v, mask_type):
    out = module(q, k, v, None, attn_mask_type=mask_type)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


@pytest.fixture
def megatron_local(megatron_single_rank):
    """What megatron's DotProductAttention needs on CPU: the bridge every run installs (its
    buffers and RNG tracker assume CUDA) and a seeded model-parallel RNG."""
    from megatron_ext import compat

    compat.setup()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)


@pytest.mark.parametrize(
    "sq, sk, heads, groups, mask, dtype, tol",
    [
        (16, 16, 4, 4, "causal", torch.float32, 1e-5),
        (19, 19, 6, 2, "causal", torch.float32, 1e-5),  # GQA, odd length
        (12, 12, 4, 2, "no_mask", torch.float32, 1e-5),
        (1, 9, 4, 2, "causal", torch.float32, 1e-5),  # a KV-cache decode step: sees every key
        (32, 32, 4, 2, "causal", torch.bfloat16, 3e-2),
    ],
)
def test_sdpa_matches_megatron_local(megatron_local, sq, sk, heads, groups, mask, dtype, tol):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    mask_type = AttnMaskType[mask]
    config = _config(heads, groups, 8, dtype)
    modules = [cls(config, 1, mask_type, "self") for cls in (DotProductAttention,
                                                           SDPACoreAttention)]
    q, k, v = _qkv(sq, sk, 2, heads, groups, 8, dtype)
    (want, want_grads), (got, got_grads) = (_run(m, q, k, v, mask_type) for m in modules)
    assert got.shape == want.shape == (sq, 2, heads * 8) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


def test_sdpa_refuses_dropout_and_masks():
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match="attention dropout 0.1 is not implemented"):
        SDPACoreAttention(_config(2, 2, 8), 1, AttnMaskType.causal, "self",
                          attention_dropout=0.1)
    attn = SDPACoreAttention(_config(2, 2, 8), 1, AttnMaskType.padding, "self")
    q, k, v = _qkv(4, 4, 1, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="attn_mask_type=padding with an explicit mask"):
        attn(q, k, v, torch.zeros(1, 1, 4, 4, dtype=torch.bool))


def _inputs(b, sq, sk, hq, hkv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, sq, hq, d))
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize(
    "sq, sk, hq, hkv, causal, dtype, tol",
    [
        (24, 24, 4, 4, True, torch.float32, 1e-5),  # the ring's diagonal block
        (13, 13, 6, 2, False, torch.float32, 1e-5),  # GQA, a full block
        (7, 20, 4, 2, True, torch.float32, 1e-5),  # more keys: bottom-right, in two pieces
        (32, 32, 4, 2, True, torch.bfloat16, 1e-4),  # computed in fp32 from bf16 inputs
    ],
)
def test_block_kernel_sdpa_matches_torch_reference(sq, sk, hq, hkv, causal, dtype, tol):
    q, k, v, dout = _inputs(2, sq, sk, hq, hkv, 16, dtype)
    results = {}
    for kernel in ("torch", "sdpa"):
        fwd = functools.partial(attention_block_forward, softmax_scale=0.3, causal=causal,
                                block=8, kernel=kernel)
        out, lse = fwd(q, k, v)
        grads = attention_block_backward(dout, q, k, v, out.to(dtype), lse, 0.3, causal,
                                         block=8, kernel=kernel)
        results[kernel] = (out, lse, *grads)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), results["sdpa"],
                               results["torch"]):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kernel", ["sdpa", "torch"])
def test_block_gradients_add_up_over_key_blocks(kernel):
    """The ring's contract: blocks merged by their LSE give full attention, and each block's
    backward with the final out and LSE gives its share of the full gradients."""
    q, k, v, dout = _inputs(1, 16, 16, 4, 2, 8, torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    scores = torch.einsum("bqhd,bkhd->bhqk", ref[0], ref[1].repeat_interleave(2, 2)) * 0.5
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    full = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), ref[2].repeat_interleave(2, 2))
    full.backward(dout)
    q, k, v, dout = (t.float() for t in (q, k, v, dout))
    # keys 0..5 are in every query's past from row 6 on; keys 6..15 form the causal diagonal
    rows = slice(6, None)
    out, lse = attention_block_forward(q[:, rows], k[:, rows], v[:, rows], 0.5, True,
                                       block=4, kernel=kernel)
    past = attention_block_forward(q[:, rows], k[:, :6], v[:, :6], 0.5, False, block=4,
                                   kernel=kernel)
    merge(out, lse, *past)
    first, first_lse = attention_block_forward(q[:, :6], k[:, :6], v[:, :6], 0.5, True,
                                               block=4, kernel=kernel)
    torch.testing.assert_close(torch.cat([first, out], 1).double(), full.detach(), atol=1e-5,
                               rtol=1e-5)
    diag = attention_block_backward(dout[:, rows], q[:, rows], k[:, rows], v[:, rows], out, lse,
                                    0.5, True, block=4, kernel=kernel)
    cross = attention_block_backward(dout[:, rows], q[:, rows], k[:, :6], v[:, :6], out, lse,
                                     0.5, False, block=4, kernel=kernel)
    top = attention_block_backward(dout[:, :6], q[:, :6], k[:, :6], v[:, :6], first, first_lse,
                                   0.5, True, block=4, kernel=kernel)
    dq = torch.cat([top[0], diag[0] + cross[0]], 1)
    dk = torch.cat([top[1] + cross[1], diag[1]], 1)
    dv = torch.cat([top[2] + cross[2], diag[2]], 1)
    for got, want in zip((dq, dk, dv), (t.grad for t in ref)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_block_kernel_rejects_unknown_kernel():
    q, k, v, _ = _inputs(1, 4, 4, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="'flex' is not one of sdpa, torch"):
        attention_block_forward(q, k, v, 1.0, True, kernel="flex")


@pytest.fixture
def machine(monkeypatch):
    """Pretend TE and flash-attn do or do not import: machine(te=..., flash=...)."""
    import megatron_ext.compat as compat

    def pretend(te=False, flash=False):
        monkeypatch.setattr(compat, "has_transformer_engine", lambda: te)
        monkeypatch.setattr(compat, "has_flash_attn", lambda: flash)

    return pretend


def test_auto_picks_te_then_flash_then_sdpa(machine):
    assert resolve_backend("auto", "fp32") == "sdpa"  # this CPU machine, nothing pretended
    machine(te=True, flash=True)
    assert resolve_backend("auto", "bf16") == "te"
    machine(flash=True)
    assert resolve_backend("auto", "bf16") == "flash"
    assert resolve_backend("auto", "fp32") == "sdpa"  # flash-attn has no fp32 kernel
    machine()
    assert resolve_backend("auto", "bf16") == "sdpa"
    for name in ("sdpa", "local"):
        assert resolve_backend(name, "fp32") == name


def test_unavailable_backends_are_errors(machine):
    machine()
    with pytest.raises(ValueError, match="attention_backend=flash but flash_attn does not "
                                         "import.*use model.attention_backend=auto or sdpa"):
        resolve_backend("flash", "bf16")
    with pytest.raises(ValueError, match="attention_backend=te but TransformerEngine does not"):
        resolve_backend("te", "bf16")
    machine(flash=True)
    with pytest.raises(ValueError, match="flash with model.dtype=fp32.*set model.dtype=bf16"):
        resolve_backend("flash", "fp32")
    with pytest.raises(ValueError, match="'fast' is not one of auto, sdpa, flash, local, te"):
        resolve_backend("fast", "fp32")


def test_config_and_layer_spec_follow_the_backend():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import ConfigError, validate
    from megatron_ext.models.attention import RingCoreAttention
    from megatron_ext.models.gpt import layer_spec

    def core(overrides):
        cfg = compose_config(["logging=none", *overrides])
        validate(cfg, cfg.parallel.cp)
        spec, line = layer_spec(cfg)
        return spec.submodules.self_attention.submodules.core_attention, line

    assert core([]) == (SDPACoreAttention, "attention: sdpa (model.attention_backend=auto)")
    assert core(["model.attention_backend=local"])[0] is DotProductAttention
    ring, line = core(["model.attention_backend=local", "parallel.cp=2"])
    assert (ring.func, ring.keywords) == (RingCoreAttention, {"kernel": "torch"})
    assert line.startswith("attention: ring attention over CP=2, torch block kernel")
    assert core(["parallel.cp=2"])[0].keywords == {"kernel": "sdpa"}
    with pytest.raises(ConfigError, match="model.attention_backend='xla' is not one of auto"):
        core(["model.attention_backend=xla"])
    with pytest.raises(ValueError, match="attention_backend=flash but flash_attn"):
        core(["model.attention_backend=flash", "data.isolate_documents=false"])
