"""Structure and notation features of one reasoning trace, and summaries of a trace file.

Lengths are UTF-8 bytes: our model's tokenizer is byte-level, so bytes are exactly the tokens
the model has to produce, and "tokens per step" needs no tokenizer dependency.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_ext.align.jsonl import Trace, read_traces

STEP_MODES = ("lines", "numbered", "think")
DEFAULT_ANSWER_PATTERN = r"A:\s*(-?\d+)"  # the built-in task's final line (see data/task.py)
NUMERIC_FEATURES = {
    "n_steps": "reasoning steps",
    "tokens_per_step": "mean bytes (= byte-level tokens) per step",
    "total_tokens": "bytes in the whole response",
    "ops_per_step": "binary operators per step (step granularity)",
    "latex_frac": "share of lines with LaTeX markup",
    "word_frac": "share of word tokens (prose vs symbols)",
    "repetition": "share of repeated token 4-grams",
    "answer_format": "1 when the last line is the expected answer line",
    "n_tags": "structural tags (e.g. think blocks), opening and closing",
}

_NUMBERED_RE = re.compile(r"^\s*(?:step\s*\d+\s*[:.)]|\d+\s*[.)])", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|\Z)", re.DOTALL)
_TAG_RE = re.compile(r"</?([A-Za-z][\w-]*)\s*/?>")
_LATEX_RE = re.compile(r"\$|\\[A-Za-z]+|\\[()\[\]]")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_SYMBOL_RE = re.compile(r"\\[A-Za-z]+|\$\$|[^\w\s]")
# A binary operator has an operand on its left and spaces on both sides or on neither ("subtract -47"
# is a unary minus).
_OP = r"(?:[-+*/×÷·]|\\times|\\cdot|\\div)"
_BINARY_OP_RE = re.compile(rf"(?<=[\w)\]}}])(?:\s+{_OP}\s+|{_OP})(?=[\w(\[{{\\-])")
_WORDISH_RE = re.compile(r"[^\W\d_]+|\d+|[^\w\s]")
_WORD_RE = re.compile(r"[^\W\d_]{2,}")
_GRAM_RE = re.compile(r"\w+|[^\w\s]")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """How to read a trace: what separates steps and what the final answer line looks like.

    steps: "lines" (each non-empty line before the answer line), "numbered" (blocks starting with
    `Step N:` / `N.` / `N)`; text before the first one is not a step) or "think" (each non-empty
    line inside `<think>...</think>`). answer_pattern must match the whole last line; its first
    group, if any, is the answer compared with the trace's `answer` field.
    """

    steps: str = "lines"
    answer_pattern: str = DEFAULT_ANSWER_PATTERN

    def __post_init__(self):
        if self.steps not in STEP_MODES:
            raise ValueError(f"steps={self.steps!r} is not one of {STEP_MODES}; pick the delimiter your traces use")
        try:
            re.compile(self.answer_pattern)
        except re.error as e:
            raise ValueError(f"answer_pattern={self.answer_pattern!r} is not a valid regular expression ({e})") from None


@dataclasses.dataclass(frozen=True)
class TraceProfile:
    n_steps: int
    tokens_per_step: float
    total_tokens: int
    ops_per_step: float
    latex_frac: float
    word_frac: float
    repetition: float
    answer_format: float
    n_tags: int
    script: str  # dominant writing system of the letters: a proxy for the language (latin, cyrillic, cjk, ...)
    symbols: Dict[str, int]  # notation: counts of operators, punctuation, LaTeX commands, `$$`
    tags: Dict[str, int]  # structural tag names (lower case), opening and closing counted
    answer_correct: Optional[bool]  # None when the trace has no `answer` or the pattern no group

    def numeric(self) -> Dict[str, float]:
        return {name: float(getattr(self, name)) for name in NUMERIC_FEATURES}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _steps(lines: List[str], response: str, mode: str) -> List[str]:
    if mode == "lines":
        return lines
    if mode == "think":
        return [s.strip() for block in _THINK_RE.findall(response) for s in block.splitlines() if s.strip()]
    blocks: List[List[str]] = []
    for line in lines:
        if _NUMBERED_RE.match(line):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]


def _script(text: str) -> str:
    counts = collections.Counter(
        "latin" if ch.isascii() else unicodedata.name(ch, "OTHER").split()[0].lower()
        for ch in text if ch.isalpha())
    return counts.most_common(1)[0][0] if counts else "none"


def _repetition(text: str) -> float:
    tokens = _GRAM_RE.findall(text)
    grams = list(zip(tokens, tokens[1:], tokens[2:], tokens[3:]))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def profile_trace(response: str, answer: Optional[str] = None, config: ProfileConfig = ProfileConfig()) -> TraceProfile:
    """The features of one response (the prompt is not part of the style being judged)."""
    lines = [s.strip() for s in response.splitlines() if s.strip()]
    pattern = re.compile(config.answer_pattern)
    final = pattern.fullmatch(lines[-1]) if lines else None
    body = lines[:-1] if final else lines
    steps = _steps(body, response, config.steps)
    step_bytes = [len(s.encode("utf-8")) for s in steps]
    n_ops = sum(len(_BINARY_OP_RE.findall(s)) for s in steps)
    tokens = _WORDISH_RE.findall(_LATEX_CMD_RE.sub(" ", response))
    tags = collections.Counter(name.lower() for name in _TAG_RE.findall(response))
    answer_correct = None
    if answer is not None and pattern.groups:
        answer_correct = final is not None and final.group(1).strip() == answer.strip()
    return TraceProfile(
        n_steps=len(steps),
        tokens_per_step=float(np.mean(step_bytes)) if steps else 0.0,
        total_tokens=len(response.encode("utf-8")),
        ops_per_step=n_ops / len(steps) if steps else 0.0,
        latex_frac=sum(bool(_LATEX_RE.search(s)) for s in lines) / len(lines) if lines else 0.0,
        word_frac=sum(bool(_WORD_RE.fullmatch(t)) for t in tokens) / len(tokens) if tokens else 0.0,
        repetition=_repetition(response),
        answer_format=float(final is not None),
        n_tags=sum(tags.values()),
        script=_script(response),
        symbols=dict(collections.Counter(_SYMBOL_RE.findall(response))),
        tags=dict(tags),
        answer_correct=answer_correct,
    )


def profile_file(path: str, config: ProfileConfig = ProfileConfig(),
                 malformed: Optional[List[str]] = None) -> Iterator[Tuple[Trace, TraceProfile]]:
    """Stream (trace, profile) pairs; `malformed` works as in read_traces."""
    for trace in read_traces(path, malformed):
        yield trace, profile_trace(trace.response, trace.answer, config)


class Summary:
    """Distribution summary of a trace set, accumulated one profile at a time."""

    def __init__(self):
        self.columns: Dict[str, List[float]] = {name: [] for name in NUMERIC_FEATURES}
        self.scripts, self.tags, self.symbols = collections.Counter(), collections.Counter(), collections.Counter()
        self.checked = self.correct = 0  # traces with a checkable answer, and how many are right

    def add(self, p: TraceProfile) -> None:
        for name, value in p.numeric().items():
            self.columns[name].append(value)
        self.scripts[p.script] += 1
        self.tags.update(p.tags)
        self.symbols.update(p.symbols)
        if p.answer_correct is not None:
            self.checked += 1
            self.correct += p.answer_correct

    def to_json(self) -> dict:
        n = len(self.columns["n_steps"])
        features = {}
        for name, values in self.columns.items():
            if values:
                q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0])
                features[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                  **{k: float(v) for k, v in zip(("min", "p10", "p50", "p90", "max"), q)}}
        total_symbols = sum(self.symbols.values()) or 1
        return {
            "n_traces": n,
            "features": features,
            "answer_correct_rate": self.correct / self.checked if self.checked else None,
            "scripts": {k: v / n for k, v in self.scripts.most_common()},
            "tags": dict(self.tags.most_common()),
            "top_symbols": {k: v / total_symbols for k, v in self.symbols.most_common(20)},
        }
