"""The training forward's one-node RoPE against megatron's unfused `_apply_rotary_pos_emb_bshd`
(values and grads in float64, bit for bit in fp32), the hook that puts it in the model, and the
RL log-prob loss on the transposed logits view the model now hands it (the same values and
grads as on the contiguous copy)."""
import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_ext.compat.rope import _fused_rope, install_fused_rope
from megatron_ext.ops.rope import apply_rope
from megatron_ext.rl.losses import logprobs_and_entropy

F64 = torch.float64


def _freqs(s, b, d, dtype=torch.float32):
    """megatron's layout: the d/2 angles twice, [s, b, 1, d]."""
    half = torch.rand(s, b, 1, d // 2, dtype=dtype) * 10
    return torch.cat([half, half], dim=-1)


@pytest.mark.parametrize("freq_batch", [1, 3], ids=["shared", "per_row"])
@pytest.mark.parametrize("halves", ["equal", "different"])
def test_rope_equals_megatrons_values_and_grads(freq_batch, halves):
    t = torch.randn(5, 3, 4, 16, dtype=F64, requires_grad=True)
    freqs = _freqs(5, freq_batch, 16, F64)
    if halves == "different":  # any table, not only megatron's halves twice
        freqs = torch.rand_like(freqs) * 10
    grad = torch.randn(5, 3, 4, 16, dtype=F64)
    ours = apply_rope(t, freqs)
    (g_ours,) = torch.autograd.grad(ours, t, grad)
    ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs)
    (g_ref,) = torch.autograd.grad(ref, t, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_rope_fp32_forward_is_megatrons_bit_for_bit():
    """Bit for bit: the decoder's logits must stay within 1e-5 of the training forward's."""
    qkv = torch.randn(7, 2, 2, 64)  # the query is a view of the fused qkv projection
    q = qkv.view(7, 2, 8, 16)[:, :, :4]
    freqs = _freqs(7, 1, 16)
    torch.testing.assert_close(apply_rope(q, freqs), rope_utils._apply_rotary_pos_emb_bshd(q, freqs),
                               rtol=0, atol=0)


def test_rope_hook_defers_what_it_does_not_do():
    t = torch.randn(4, 2, 2, 16, dtype=F64)
    freqs = _freqs(4, 1, 16, F64)
    for kwargs, ref in [({"interleaved": True}, rope_utils._apply_rotary_pos_emb_bshd(
                            t, freqs, rotary_interleaved=True)),
                        ({}, rope_utils._apply_rotary_pos_emb_bshd(t, freqs[..., :8]))]:
        f = freqs if kwargs else freqs[..., :8]  # interleaved; partial rotary (half the dim)
        torch.testing.assert_close(_fused_rope(t, f, **kwargs), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="whole, even head dim"):
        apply_rope(t, freqs[..., :8])


def test_rope_hook_serves_megatrons_fusion_flag():
    assert install_fused_rope() is True  # no TE here: ours is megatron's fused RoPE
    assert rope_utils.fused_apply_rotary_pos_emb is _fused_rope
    assert install_fused_rope() is True  # idempotent


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_logprob_loss_on_the_transposed_logits_view(entropy_grad):
    """The model returns training logits as the [b, s, v] view of its [s, b, v] output: the
    loss gives what it gives on the contiguous copy, and its gradient comes back in the
    output layer's own order (contiguous, no copy), padding columns zero."""
    torch.manual_seed(0)
    base = torch.randn(6, 4, 24, dtype=F64)  # [s, b, v_padded]
    targets = torch.randint(0, 20, (4, 6))
    got = []
    for view in (True, False):
        logits = base.clone().requires_grad_()
        x = logits.transpose(0, 1) if view else logits.transpose(0, 1).contiguous()
        logp, ent = logprobs_and_entropy(x, targets, vocab_size=20, entropy_grad=entropy_grad)
        loss = logp.sum() + (ent.sum() if entropy_grad else 0.0)
        loss.backward()
        got.append((logp, ent, logits.grad))
    (lp, ent, grad), (lp_ref, ent_ref, grad_ref) = got
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)
    assert grad.is_contiguous() and grad[..., 20:].abs().max() == 0


@pytest.fixture(scope="module")
def world():
    from megatron_ext import compat

    compat.setup()
    from parallel import topology

    yield topology
    topology.destroy()


def test_model_forward_and_grads_are_megatrons_bit_for_bit(world):
    """The tiny model with our RoPE and the logits view against the same weights on megatron's
    unfused RoPE and `.contiguous()` logits: the same loss, logits and gradients, bit for bit,
    for the SFT loss (labels) and an RL log-prob objective (logits)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import build_gpt_chunks

    cfg = compose_config(["logging=none", "model=tiny", "model.init_method_std=0.2"])
    topo = world.initialize(validate(cfg, 1), seed=cfg.seed)
    ours, ref = (build_gpt_chunks(cfg, topo, 259)[0] for _ in range(2))
    assert ours.config.apply_rope_fusion  # ours serves megatron's fused-RoPE hook here
    ref.config.apply_rope_fusion = False  # megatron's unfused chain
    own = ref._postprocess  # with labels: the fused loss; without: megatron's contiguous logits
    ref._postprocess = lambda *a, labels=None, **k: (
        own(*a, labels=labels, **k) if labels is not None
        else GPTModel._postprocess(ref, *a, labels=labels, **k))
    ref.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, 259, (6, 24), generator=gen) for _ in range(2))
    positions = torch.arange(24).expand(6, -1)
    got, layouts = [], []
    for model in (ours, ref):
        model.train()
        model.zero_grad()
        loss = model(tokens, positions, None, labels=labels)
        loss.sum().backward()
        sft = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        logits = model(tokens, positions, None)
        layouts.append(logits.is_contiguous())
        logp, _ = logprobs_and_entropy(logits, labels, vocab_size=259, entropy_grad=False)
        logp.sum().backward()
        got.append(sft + [logits.detach().contiguous()] + [p.grad for p in model.parameters()])
    assert layouts == [False, True] and len(got[0]) == len(got[1])
    for a, b in zip(*got):
        assert torch.equal(a, b)
