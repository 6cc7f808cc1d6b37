"""The pass rate's verdicts: taken from the reward's own verifier term when the reward has it
(math-verify is too slow to run twice per response), judged afresh otherwise, and the same
either way."""
import pytest

from megatron_ext.data.problems import ProblemRecord
from megatron_ext.data.task import ArithmeticTask
from megatron_ext.rl import experience
from megatron_ext.rl.rewards import CombinedReward, is_correct


@pytest.fixture
def judged(monkeypatch):
    calls = []

    def counting(text, problem):
        calls.append(text)
        return is_correct(text, problem)

    monkeypatch.setattr(experience, "is_correct", counting)
    return calls


@pytest.mark.parametrize("kind", ["task", "jsonl"])
def test_verdicts_reuse_the_verifier_term(kind, judged):
    if kind == "task":
        problems = ArithmeticTask(0, 1, 1, 5).take(3, "train")
        texts = [p.response() for p in problems[:2]] + ["A: -999\n"]
        verifier = "task_correct"
    else:
        problems = [ProblemRecord({"answer": a}, "Q") for a in ("4", "1/2", "7")]
        texts = ["so \\boxed{4}", "the answer is 0.5", "\\boxed{8}"]
        verifier = "math"
    want = [is_correct(t, p) for t, p in zip(texts, problems)]
    assert want == [1.0, 1.0, 0.0]

    _, parts = CombinedReward([{"name": verifier, "weight": 0.5},
                               {"name": "format", "weight": 1.0}]).score(texts, problems)
    assert experience.verdicts(parts, texts, problems).tolist() == want and not judged

    _, parts = CombinedReward([{"name": "format", "weight": 1.0}]).score(texts, problems)
    assert experience.verdicts(parts, texts, problems).tolist() == want
    assert judged == texts  # no verifier term in the reward: judged here, once each
