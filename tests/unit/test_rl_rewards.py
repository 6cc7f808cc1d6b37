"""Reward registry, the task verifier and format rewards, the combiner, and that model text is
never executed."""

import pytest
import torch

from megatron_ext.data.task import ArithmeticTask
from megatron_ext.config.rl import RewardSpec
from megatron_ext.rl.rewards import CombinedReward, get_reward, register_reward

PROBLEM = ArithmeticTask(seed=3).take(1)[0]
GOOD = PROBLEM.response()  # the target rendering: steps, then "A: <answer>"


def test_task_correct():
    correct = get_reward("task_correct")
    assert correct(GOOD, PROBLEM) == 1.0
    assert correct(f"A: {PROBLEM.answer + 1}\n", PROBLEM) == 0.0  # wrong
    assert correct(f"A: {PROBLEM.answer}.5\n", PROBLEM) == 0.0  # malformed
    assert correct(f"the answer is {PROBLEM.answer}", PROBLEM) == 0.0  # no answer line
    assert correct("", PROBLEM) == 0.0
    # the last answer line counts
    assert correct(f"A: {PROBLEM.answer + 1}\nA: {PROBLEM.answer}\n", PROBLEM) == 1.0


def test_format():
    fmt = get_reward("format")
    assert fmt(GOOD, PROBLEM) == 1.0
    assert fmt("3-8=-5\n-5*2=-10\nA: -10", PROBLEM) == 1.0  # no trailing newline, negatives
    assert fmt(PROBLEM.response("verbose"), PROBLEM) == 0.0
    assert fmt(PROBLEM.response("latex"), PROBLEM) == 0.0
    assert fmt(f"A: {PROBLEM.answer}\n", PROBLEM) == 0.0  # no steps
    assert fmt(GOOD + "extra\n", PROBLEM) == 0.0  # text after the answer


def test_model_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for text in (f"{code}\nA: {PROBLEM.answer}\n", f"A: {code}\n", f"1+1=2\nA: ({code}) or 0\n"):
        for name in ("task_correct", "format"):
            get_reward(name)(text, PROBLEM)
    assert not marker.exists()
    assert get_reward("task_correct")(f"A: {code}\n", PROBLEM) == 0.0


def test_combiner_and_registry():
    combined = CombinedReward([{"name": "task_correct", "weight": 1.0},
                               RewardSpec(name="format", weight=0.25)])
    wrong_fmt = f"A: {PROBLEM.answer}\n"
    total, parts = combined.score([GOOD, wrong_fmt, "nothing"], [PROBLEM] * 3)
    assert total.tolist() == [1.25, 1.0, 0.0]
    assert parts["format"].tolist() == [1.0, 0.0, 0.0] and total.dtype == torch.float32
    with pytest.raises(KeyError, match="'nope' is not registered; known: .*task_correct"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("format")(lambda r, p: 0.0)
    with pytest.raises(ValueError, match="finite"):
        CombinedReward([{"name": "format", "weight": float("inf")}])

    @register_reward("test_length_penalty")
    def length_penalty(response, problem):
        return -0.01 * len(response)
    total, _ = CombinedReward([{"name": "test_length_penalty", "weight": 2.0}]).score(
        ["abcd"], [PROBLEM])
    assert total.item() == pytest.approx(-0.08)
