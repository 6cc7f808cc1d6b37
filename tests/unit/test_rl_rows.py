"""Rollout groups -> shifted training rows -> fixed-shape micro-batches; PPO's token rewards;
the regression guard's verdicts."""
import torch

from megatron_ext.rl.experience import Group
from megatron_ext.rl.guard import RegressionGuard
from megatron_ext.rl.rows import last_token_rewards, micro_batches, rows_from_groups


def _group(index, tokens, prompt_len, pad=9):
    t = torch.tensor(tokens)
    mask = torch.zeros_like(t, dtype=torch.float32)
    mask[:, prompt_len:] = (t[:, prompt_len:] != pad).float()
    logp = -0.5 * mask
    return Group(index, t, mask, logp, torch.ones(len(t)), torch.ones(len(t)),
                 mask.sum(1).long(), 0)


def test_rows_shift_and_pad_across_groups():
    short = _group(0, [[1, 2, 3], [1, 2, 9]], prompt_len=2)
    long = _group(1, [[5, 6, 7, 8], [5, 6, 7, 9]], prompt_len=2)
    rows = rows_from_groups([short, long], pad_id=9)
    assert rows["tokens"].tolist() == [[1, 2, 3], [1, 2, 9], [5, 6, 7], [5, 6, 7]]
    assert rows["targets"].tolist() == [[2, 3, 9], [2, 9, 9], [6, 7, 8], [6, 7, 9]]
    # mask[:, j] is about targets[:, j]: the generated tokens only
    assert rows["mask"].tolist() == [[0, 1, 0], [0, 0, 0], [0, 1, 1], [0, 1, 0]]
    assert torch.equal(rows["old_logp"], -0.5 * rows["mask"])


def test_micro_batches_have_fixed_shapes_and_masked_padding():
    rows = {"tokens": torch.arange(15).view(5, 3), "mask": torch.ones(5, 3),
            "advantages": torch.ones(5, 3)}
    parts = micro_batches(rows, 2, torch.device("cpu"))
    assert len(parts) == 3 and all(p["tokens"].shape == (2, 3) for p in parts)
    assert parts[2]["mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert parts[0]["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    empty = micro_batches({k: v[:0] for k, v in rows.items()}, 2, torch.device("cpu"))
    assert len(empty) == 1 and empty[0]["mask"].sum() == 0


def test_last_token_rewards_sit_on_the_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1.0]])
    out = last_token_rewards(torch.tensor([2.0, 5.0, -1.0]), mask)
    assert out.tolist() == [[0, 0, 2, 0], [0, 0, 0, 0], [0, 0, 0, -1]]


class _Policy:
    """What the guard asks of the policy unit: the LR scaling of its param groups."""

    def __init__(self):
        self.param_groups = [{}]

    def scale_lr(self, scale, lr, min_lr):
        self.param_groups[0].update(max_lr=lr * scale, min_lr=min_lr * scale)


def test_guard_verdicts_and_state():
    guard = RegressionGuard(0.05, "halve_lr", _Policy(), lr=1e-3, min_lr=1e-4)
    assert guard.judge(0.5) == "best"
    guard.best_accuracy = 0.5
    assert guard.judge(0.46) == "ok" and guard.judge(0.44) == "regressed"
    assert guard.judge(0.6) == "best"
    guard.lr_scale = 0.25
    policy = _Policy()
    other = RegressionGuard(0.0, "stop", policy, lr=1e-3, min_lr=1e-4)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == guard.state_dict()
    # a resumed guard puts its LR halvings back on the schedule
    assert policy.param_groups[0] == {"max_lr": 0.25e-3, "min_lr": 0.25e-4}
