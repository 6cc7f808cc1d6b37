"""GRPO advantages, GAE and whitening against hand-computed values."""

import math

import pytest
import torch

from megatron_ext.rl import gae, grpo_advantages, whiten


def test_grpo_centres_and_scales_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    adv = grpo_advantages(rewards, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 1: mean 1, std sqrt(2/3)
    s0, s1 = math.sqrt(1 / 3), math.sqrt(2 / 3)
    want = torch.tensor([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [1 / s1, -1 / s1, 0.0, 0.0]])
    assert torch.allclose(adv, want, atol=1e-6)
    centred = grpo_advantages(rewards, normalize_std=False)
    assert torch.allclose(centred, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))
    assert adv.dtype == torch.float32


def test_grpo_equal_rewards_give_exact_zero_not_nan():
    # 0.1 is not exact in binary: mean - value is rounding noise that /eps would blow up
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]],
                           dtype=torch.bfloat16)
    adv = grpo_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert adv[2, 1] > 0 > adv[2, 0]


def test_grpo_rejects_bad_input():
    with pytest.raises(ValueError, match="group size 1"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\[prompts, group\]"):
        grpo_advantages(torch.ones(3))
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        grpo_advantages(torch.tensor([[1.0, float("nan")]]))


def test_gae_matches_hand_computation_with_masked_tail():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.0, 2.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [1.0, 1.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma, lam)

    def by_hand(r, v):  # episode ends after the last unmasked token: bootstrap 0
        out, running = [0.0] * len(r), 0.0
        for t in reversed(range(len(r))):
            nxt = v[t + 1] if t + 1 < len(r) else 0.0
            running = r[t] + gamma * nxt - v[t] + gamma * lam * running
            out[t] = running
        return out

    row0 = by_hand([0.0, 0.0, 1.0], [0.5, 0.4, 0.3])
    row1 = by_hand([0.0, 2.0], [1.0, 1.5])
    want = torch.tensor([row0 + [0.0], row1 + [0.0, 0.0]])
    assert torch.allclose(adv, want, atol=1e-6)
    assert torch.allclose(ret, (want + values) * mask, atol=1e-6)
    # last valid token: delta = r - V exactly
    assert adv[0, 2].item() == pytest.approx(1.0 - 0.3)


def test_gae_skips_interior_masked_tokens():
    rewards = torch.tensor([[0.0, 123.0, 1.0]])
    values = torch.tensor([[0.2, 50.0, 0.6]])
    adv, _ = gae(rewards, values, torch.tensor([[1.0, 0.0, 1.0]]), 1.0, 1.0)
    plain, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.6]]), torch.ones(1, 2),
                   1.0, 1.0)
    assert torch.allclose(adv[0, [0, 2]], plain[0]) and adv[0, 1] == 0


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    out = whiten(x, mask, eps=0.0)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (vals - 3.0) / vals.std(unbiased=False)
    assert torch.allclose(out[mask > 0], want, atol=1e-6)
    assert torch.equal(out[mask == 0], torch.zeros(3))
    kept = whiten(x, mask, shift_mean=False, eps=0.0)
    assert torch.allclose(kept[mask > 0], want + 3.0, atol=1e-6)
    with pytest.raises(ValueError, match="no entries"):
        whiten(x, torch.zeros_like(x))
