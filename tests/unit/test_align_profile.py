"""Trace features, the streaming JSONL reader and the distribution distances."""
import json

import numpy as np
import pytest

from megatron_ext.align.divergence import js_divergence, ks_statistic, wasserstein_1
from megatron_ext.align.jsonl import TraceFormatError, read_traces
from megatron_ext.align.profile import ProfileConfig, Summary, profile_file, profile_trace


def test_target_trace_features():
    p = profile_trace("3*4=12\n12+5=17\nA: 17\n", answer="17")
    assert p.n_steps == 2  # the answer line is not a step
    assert p.tokens_per_step == pytest.approx((6 + 7) / 2)
    assert p.total_tokens == len("3*4=12\n12+5=17\nA: 17\n")
    assert p.ops_per_step == 1.0 and p.latex_frac == 0.0 and p.word_frac == 0.0
    assert p.answer_format == 1.0 and p.answer_correct is True
    assert p.symbols == {"*": 1, "=": 2, "+": 1, ":": 1}
    assert profile_trace("3*4=12\nA: 12\n", answer="13").answer_correct is False
    assert profile_trace("3*4=12\nA: 12\n").answer_correct is None


def test_missing_answer_line_counts_every_line_as_a_step():
    p = profile_trace("3*4=12\n12+5=17\nso it is 17\n", answer="17")
    assert p.answer_format == 0.0 and p.answer_correct is False and p.n_steps == 3


def test_lengths_are_utf8_bytes():
    assert profile_trace("é=é\nA: 1\n").tokens_per_step == 5  # two bytes per é


def test_step_modes():
    numbered = "Let me think.\nStep 1: 3*4=12\nso twelve\nStep 2: 12+5=17\nA: 17\n"
    p = profile_trace(numbered, config=ProfileConfig(steps="numbered"))
    assert p.n_steps == 2  # the preamble is not a step, the continuation line belongs to step 1
    assert p.tokens_per_step == pytest.approx((len("Step 1: 3*4=12\nso twelve") + len("Step 2: 12+5=17")) / 2)
    assert profile_trace("1. a\n2) b\n3. c\nA: 1", config=ProfileConfig(steps="numbered")).n_steps == 3
    think = "<think>\n3*4=12\n\n12+5=17\n</think>\nA: 17\n"
    p = profile_trace(think, config=ProfileConfig(steps="think"))
    assert p.n_steps == 2 and p.tags == {"think": 2} and p.n_tags == 2
    assert profile_trace(think).n_steps == 4  # in "lines" mode the tag lines count too


def test_notation_language_and_repetition():
    latex = profile_trace("$$3 \\times 4 = 12$$\nA: 12\n")
    assert latex.latex_frac == 0.5 and latex.ops_per_step == 1.0 and latex.symbols["\\times"] == 1
    assert latex.word_frac == 0.0  # \times is notation, not a word
    prose = profile_trace("Next we subtract -47 and 2, which gives -49.\nA: -49\n")
    assert prose.ops_per_step == 0.0  # "-47" is a negative number, not a subtraction
    assert prose.word_frac > 0.3
    assert profile_trace("Сначала умножим 3 на 4.\nA: 12").script == "cyrillic"
    assert profile_trace("先算三乘四。\nA: 12").script == "cjk"
    assert profile_trace("a b c\n" * 5 + "A: 1").repetition > 0.5
    assert profile_trace("3*4=12\nA: 12").repetition == 0.0


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="steps='paragraphs'"):
        ProfileConfig(steps="paragraphs")
    with pytest.raises(ValueError, match="answer_pattern"):
        ProfileConfig(answer_pattern="A: (")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_malformed_lines_raise_with_file_and_line(tmp_path):
    good = json.dumps({"prompt": "Q: 1+1\n", "response": "1+1=2\nA: 2\n", "answer": 2})
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"prompt": "Q"}): "'response'",
        json.dumps([1, 2]): "not a JSON object",
        json.dumps({"prompt": "Q", "response": "A: 1", "answer": True}): "'answer'",
    }
    for bad, what in cases.items():
        path = _write(tmp_path / "t.jsonl", [good, "", bad])
        with pytest.raises(TraceFormatError, match=f"t.jsonl:3: .*{what}"):
            list(read_traces(path))


def test_skip_mode_reports_every_malformed_line_and_keeps_going(tmp_path):
    good = json.dumps({"prompt": "Q", "response": "1+1=2\nA: 2"})
    path = _write(tmp_path / "t.jsonl", [good, "{", good, "", "[]", good])
    malformed = []
    traces = list(read_traces(path, malformed))
    assert [t.line for t in traces] == [1, 3, 6]
    assert [m.split(": ")[0] for m in malformed] == [f"{path}:2", f"{path}:5"]


def test_summary(tmp_path):
    rows = [{"prompt": "Q", "response": f"{i}+1={i + 1}\nA: {i + 1}", "answer": i + 1 - (i == 0)} for i in range(5)]
    path = _write(tmp_path / "t.jsonl", [json.dumps(r) for r in rows])
    summary = Summary()
    for _, p in profile_file(path):
        summary.add(p)
    s = summary.to_json()
    assert s["n_traces"] == 5 and s["answer_correct_rate"] == 0.8
    assert s["features"]["n_steps"]["p50"] == 1.0 and s["scripts"] == {"latin": 1.0}


def test_divergences():
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([1, 2], [5, 6]) == 1.0
    assert ks_statistic([1, 2, 3], [2, 3, 4]) == pytest.approx(1 / 3)
    assert wasserstein_1([1, 2, 3], [3, 4, 5]) == pytest.approx(2.0)  # a shift by 2
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(1.0, size=300)
    assert wasserstein_1(a, b) == pytest.approx(abs(np.mean(b) - np.mean(a)), rel=0.2)
    assert js_divergence({"a": 1}, {"b": 3}) == 1.0
    assert js_divergence({"a": 1, "b": 1}, {"a": 2, "b": 2}) == 0.0
    p, q = {"a": 3, "b": 1}, {"a": 1, "b": 1, "c": 2}
    assert 0 < js_divergence(p, q) < 1
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p))
    assert js_divergence({}, {}) == 0.0
    with pytest.raises(ValueError, match="empty"):
        ks_statistic([], [1.0])
