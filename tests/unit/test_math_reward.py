"""The `math` reward: final-answer extraction, math-verify equivalence, hostile responses within
the time limit, user rewards by import path, and JSONL problem records."""
import json
import sys
import time

import pytest

from megatron_ext.config.fields import ConfigError
from megatron_ext.config.rl import check_reward_name
from megatron_ext.data.examples import DataError
from megatron_ext.data.problems import read_problems
from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.rl.math_answer import TIME_LIMIT_S, extract_final_answer, math_correct
from megatron_ext.rl.rewards import CombinedReward, get_reward, is_correct

# (response, reference answer, expected reward)
CASES = [
    ("so the result is \\boxed{\\frac{1}{2}}.", "1/2", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\tfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("\\boxed{2/3}", "0.67", 0.0),
    ("\\boxed{0.333}", "1/3", 0.0),
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{1.25}", "5/4", 1.0),
    ("\\boxed{1.5}", "1.50", 1.0),
    ("First \\boxed{1}, then on reflection \\boxed{2}", "2", 1.0),
    ("First \\boxed{1}, then on reflection \\boxed{2}", "1", 0.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "1/\\sqrt{2}", 1.0),
    ("\\boxed{x^{2}+1}", "1 + x^2", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),
    ("$\\boxed{12}$ apples", "12", 1.0),
    ("Let me think.\n#### 42", "42", 1.0),
    ("#### 41", "42", 0.0),
    ("Adding them up, the answer is 7.", "7", 1.0),
    ("The final answer is: $\\frac{7}{2}$", "3.5", 1.0),
    ("I think it is seven", "7", 0.0),
    ("no answer at all", "3", 0.0),
    ("", "3", 0.0),
    ("\\boxed{}", "0", 0.0),
    ("\\boxed{\\frac{1}{2}", "1/2", 0.0),  # the box never closes
    ("\\boxed{\\boxed{5}}", "5", 1.0),
    ("\\fbox{9}", "9", 1.0),
]


@pytest.mark.parametrize("response,answer,want", CASES)
def test_math_reward_table(response, answer, want):
    assert math_correct(response, answer) == want


def test_extraction_prefers_the_last_box_and_keeps_nested_braces():
    assert extract_final_answer("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c") == "\\frac{a}{b^{2}}"
    assert extract_final_answer("\\boxed{2}\n#### 3") == "2"  # a box wins over ####
    assert extract_final_answer("#### 3\nthe answer is 4") == "3"
    assert extract_final_answer("nothing") is None


@pytest.mark.parametrize("hostile", [
    "x" * 1_000_000 + " the answer is " + "9" * 1_000_000,
    "\\boxed{" * 200_000,
    "\\boxed{" + "{" * 100 + "1" + "}" * 101,
    "\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 41,
    "\\boxed{9^{999999999}}",  # sympy would spend minutes inside C on it
    "\\boxed{(10^{8})!}",
], ids=["1MB", "open-boxes", "nested-braces", "nested-fracs", "huge-power", "factorial"])
def test_hostile_responses_score_zero_within_the_limit(hostile):
    assert math_correct("\\boxed{1}", "1") == 1.0  # a warm worker: its start is not counted
    start = time.perf_counter()
    assert math_correct(hostile, "1/2") == 0.0
    assert time.perf_counter() - start < TIME_LIMIT_S + 0.5


def test_math_reward_reads_the_record_answer_and_user_rewards_by_path(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def score(response, record):\n    return float(len(response)) + record['bonus']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "Q: 1/2?", "answer": "0.5", "bonus": 10}) + "\n")
    records, _ = read_problems(str(src), ByteTokenizer())
    assert records[0].prompt == "Q: 1/2?" and records[0].answer == "0.5"
    reward = CombinedReward([{"name": "math", "weight": 2.0},
                             {"name": "myrewards:score", "weight": 1.0}])
    total, parts = reward.score(["\\boxed{\\frac{1}{2}}", "\\boxed{1}"], records * 2)
    assert parts["math"].tolist() == [1.0, 0.0]
    assert total.tolist() == [2.0 + 19 + 10, 9.0 + 10]
    assert is_correct("\\boxed{1/2}", records[0]) == 1.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        get_reward("myrewards:nope")
    check_reward_name("rl.rewards[0].name", "myrewards:score")
    sys.modules.pop("myrewards", None)


def test_reward_names_are_checked_before_start():
    with pytest.raises(ConfigError, match=r"rl.rewards\[0\].name='no_such_mod:score': module "
                                          "'no_such_mod' is not importable"):
        check_reward_name("rl.rewards[0].name", "no_such_mod:score")
    with pytest.raises(ConfigError, match="is not one of task_correct, format, math"):
        check_reward_name("rl.rewards[0].name", "maths")


def test_problem_records_name_bad_lines(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n{"messages": []}\n')
    with pytest.raises(DataError, match=rf'{src}:2: malformed line \(needs an "answer"'):
        read_problems(str(src), ByteTokenizer())
    records, skipped = read_problems(str(src), ByteTokenizer(), "skip")
    assert len(records) == 1 and skipped == 2
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}],
                                "answer": 2}) + "\n")
    with pytest.raises(DataError, match="no chat template"):
        read_problems(str(chat), ByteTokenizer())
