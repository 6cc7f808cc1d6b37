"""Policy loss, value loss, KL estimators and (unsharded) entropy/log-probs against values
computed by hand. The vocab-parallel cases run on gloo in tests/dist/test_rl_rollout.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.rl import policy_loss
from megatron_ext.rl.losses import (aggregate, agg_count, entropy_from_logits, kl_penalty,
                                    logprobs_from_logits, value_loss)

NAN = float("nan")


def _batch():
    """Five unmasked tokens, one per case, and garbage under the mask.
    row 0: r=1.5 A=+1 (clipped high) | r=0.5 A=-1 (clipped low) | r=1.5 A=-1 (unclipped) | pad
    row 1: r=0.5 A=+1 (unclipped)    | r=1.1 A=+2 (inside)      | pad | pad"""
    ratio = torch.tensor([[1.5, 0.5, 1.5, 1.0], [0.5, 1.1, 1.0, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.5, -0.7, -1.0, -1.0]])
    logp = (old + ratio.log()).clone()
    logp[0, 3], logp[1, 2], logp[1, 3] = NAN, float("-inf"), 50.0
    adv = torch.tensor([[1.0, -1.0, -1.0, NAN], [1.0, 2.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    return logp.requires_grad_(), old, adv, mask


# per-token losses -min(rA, clip(r)A) with clip range [0.8, 1.28]
TOKEN_LOSS = [[-1.28, 0.8, 1.5], [-0.5, -2.2]]


@pytest.mark.parametrize("agg,want", [
    ("token-mean", (-1.28 + 0.8 + 1.5 - 0.5 - 2.2) / 5),
    ("seq-mean-token-sum", ((-1.28 + 0.8 + 1.5) + (-0.5 - 2.2)) / 2),
    ("seq-mean-token-mean", ((-1.28 + 0.8 + 1.5) / 3 + (-0.5 - 2.2) / 2) / 2),
])
def test_policy_loss_values(agg, want):
    logp, old, adv, mask = _batch()
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg)
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)
    assert m["dual_clip_frac"].item() == 0
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5, abs=1e-6)
    assert m["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    k3 = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.1)) / 5
    assert m["approx_kl"].item() == pytest.approx(k3, abs=1e-6)


def test_policy_loss_gradient_flows_only_through_unclipped_tokens():
    logp, old, adv, mask = _batch()
    loss, _ = policy_loss(logp, old, adv, mask)
    loss.backward()
    grad = logp.grad
    assert torch.isfinite(grad).all()
    # d(-A r)/dlogp = -A r, divided by 5 tokens; clipped and masked tokens get 0
    want = torch.tensor([[0.0, 0.0, 1.5, 0.0], [-0.5, -2.2, 0.0, 0.0]]) / 5
    assert torch.allclose(grad, want, atol=1e-6)


def test_policy_loss_sequence_advantages_broadcast_and_denominator():
    logp, old, _, mask = _batch()
    seq_adv = torch.tensor([0.7, -1.3])
    a, _ = policy_loss(logp, old, seq_adv, mask)
    b, _ = policy_loss(logp, old, seq_adv[:, None].expand(2, 4), mask)
    assert a.item() == pytest.approx(b.item())
    total, _ = policy_loss(logp, old, seq_adv, mask, denominator=1.0)
    assert total.item() == pytest.approx(a.item() * 5, rel=1e-6)
    assert agg_count(mask, "token-mean").item() == 5 and agg_count(mask, "seq-mean-token-mean") == 2


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(4.0), math.log(2.0), math.log(4.0)]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # r=4, A=-1: 4 capped at 3; r=2, A=-1: 2 (below the cap); r=4, A=+1: -1.28 (clipped high)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.28) / 3, abs=1e-6)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    plain, _ = policy_loss(logp, old, adv, mask)
    assert plain.item() == pytest.approx((4.0 + 2.0 - 1.28) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="dual_clip=0.5"):
        policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_policy_loss_empty_mask_and_bad_agg():
    logp, old, adv, _ = _batch()
    loss, m = policy_loss(logp, old, adv, torch.zeros(2, 4))
    assert loss.item() == 0 and m["clip_frac"].item() == 0
    with pytest.raises(ValueError, match="agg='mean'"):
        aggregate(torch.ones(2, 2), torch.ones(2, 2), "mean")


def test_value_loss_clipping():
    values = torch.tensor([[1.0, 1.6, NAN]])
    old = torch.tensor([[1.5, 1.5, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = value_loss(values, old, returns, mask, 0.2)
    # token 0: max((1-0)^2, (1.3-0)^2) = 1.69; token 1: inside the clip, (1.6-3)^2 = 1.96
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.96) / 2, abs=1e-6)
    assert m["vf_clip_frac"].item() == pytest.approx(0.5)
    plain, _ = value_loss(values, old, returns, mask, None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 1.96) / 2, abs=1e-6)


def test_kl_penalty():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    d = ref - logp
    assert torch.allclose(kl_penalty(logp, ref, "k3"), d.exp() - d - 1)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kind='k2'"):
        kl_penalty(logp, ref, "k2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_and_logprobs_unsharded(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 12, generator=gen) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 10, (3, 5), generator=gen)
    ref_logits = logits.detach().double().requires_grad_()
    ref_lp = F.log_softmax(ref_logits[..., :10] / 0.7, dim=-1)
    want_logp = ref_lp.gather(-1, targets[..., None]).squeeze(-1)
    want_ent = -(ref_lp.exp() * ref_lp).sum(-1)
    (want_logp.sum() + 0.3 * want_ent.sum()).backward()

    logp = logprobs_from_logits(logits, targets, vocab_size=10, temperature=0.7)
    ent = entropy_from_logits(logits, vocab_size=10, temperature=0.7)
    assert logp.dtype == ent.dtype == torch.float32
    (logp.sum() + 0.3 * ent.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    assert torch.allclose(logp.double(), want_logp, atol=tol)
    assert torch.allclose(ent.double(), want_ent, atol=tol)
    grad_tol = tol if dtype == torch.float32 else 2e-2  # the gradient comes back in bf16
    assert torch.allclose(logits.grad.double(), ref_logits.grad, atol=grad_tol)
    assert torch.equal(logits.grad[..., 10:], torch.zeros_like(logits.grad[..., 10:]))
