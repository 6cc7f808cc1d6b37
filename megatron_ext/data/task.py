"""The built-in reasoning task: multi-step integer arithmetic with a verifiable answer.

It serves pretraining and SFT (prompt + chain-of-thought response), RL (the verifier is the
reward) and the format-fidelity tools (the same solution rendered in several styles). Problems
are a pure function of (seed, index), so every rank and every resume sees the same data, and the
held-out split is decided by a hash of the prompt, so no held-out problem leaks into training.
"""
from __future__ import annotations

import dataclasses
import random
import re
import zlib
from typing import Iterator, List, Optional, Tuple

HELDOUT_MODULUS = 10  # one problem in ten is held out
_ANSWER_RE = re.compile(r"^A:\s*(-?\d+)\s*$", re.MULTILINE)
_OPS = "+-*"
STYLES = ("target", "verbose", "coarse", "latex")


@dataclasses.dataclass(frozen=True)
class Problem:
    """An expression, its evaluation steps in the order a careful solver takes them, the answer."""

    expression: str
    steps: Tuple[Tuple[str, str, str, int], ...]  # (left, op, right, value)
    answer: int

    @property
    def prompt(self) -> str:
        return f"Q: {self.expression}\n"

    def response(self, style: str = "target") -> str:
        return render(self, style)


def _evaluate(tokens: List[str]) -> Tuple[Tuple[Tuple[str, str, str, int], ...], int]:
    """Evaluate left to right with * before + and -, recording one step per operation."""
    tokens = list(tokens)
    steps = []
    for ops in ("*", "+-"):
        i = 1
        while i < len(tokens):
            if tokens[i] in ops:
                left, op, right = tokens[i - 1], tokens[i], tokens[i + 1]
                a, b = int(left), int(right)
                value = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append((left, op, right, value))
                tokens[i - 1 : i + 2] = [str(value)]
            else:
                i += 2
    return tuple(steps), int(tokens[0])


def is_heldout(expression: str) -> bool:
    return zlib.crc32(expression.encode()) % HELDOUT_MODULUS == 0


class ArithmeticTask:
    """Deterministic generator of problems with 2..max_ops operators and operands 1..max_operand."""

    def __init__(self, seed: int = 0, min_ops: int = 1, max_ops: int = 2, max_operand: int = 9):
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"task ops range [{min_ops}, {max_ops}] is empty; need 1 <= min_ops <= max_ops")
        if max_operand < 1:
            raise ValueError(f"task max_operand={max_operand} must be >= 1")
        self.seed, self.min_ops, self.max_ops, self.max_operand = seed, min_ops, max_ops, max_operand

    def _candidate(self, index: int) -> Problem:
        rng = random.Random(f"{self.seed}:{index}")
        n_ops = rng.randint(self.min_ops, self.max_ops)
        tokens = [str(rng.randint(1, self.max_operand))]
        for _ in range(n_ops):
            tokens += [rng.choice(_OPS), str(rng.randint(1, self.max_operand))]
        steps, answer = _evaluate(tokens)
        return Problem("".join(tokens), steps, answer)

    def problems(self, split: str = "train", start: int = 0) -> Iterator[Problem]:
        """An endless stream of the split's problems, from candidate index `start` on."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split={split!r} is not one of 'train', 'heldout'")
        want_heldout = split == "heldout"
        index = start
        while True:
            problem = self._candidate(index)
            index += 1
            if is_heldout(problem.expression) == want_heldout:
                yield problem

    def take(self, n: int, split: str = "train", start: int = 0) -> List[Problem]:
        stream = self.problems(split, start)
        return [next(stream) for _ in range(n)]


def render(problem: Problem, style: str = "target") -> str:
    """The solution in one of the styles. `target` is the format the model is trained to produce;
    the others are the same solution in misaligned formats (wordy, one coarse step, LaTeX)."""
    if style == "target":
        lines = [f"{l}{op}{r}={v}" for l, op, r, v in problem.steps]
        return "\n".join(lines + [f"A: {problem.answer}"]) + "\n"
    if style == "verbose":
        names = {"+": "add", "-": "subtract", "*": "multiply"}
        lines = [
            f"Step {i}: Next we {names[op]} {l} and {r}, which gives us the result {v}."
            for i, (l, op, r, v) in enumerate(problem.steps, 1)
        ]
        return "\n".join(["Let us work through this problem carefully, one step at a time."]
                         + lines + [f"Therefore, the final answer is {problem.answer}.",
                                    f"A: {problem.answer}"]) + "\n"
    if style == "coarse":
        return f"{problem.expression}={problem.answer}\nA: {problem.answer}\n"
    if style == "latex":
        sym = {"+": "+", "-": "-", "*": r"\times"}
        lines = [f"$${l} {sym[op]} {r} = {v}$$" for l, op, r, v in problem.steps]
        return "\n".join(lines + [rf"A: {problem.answer}"]) + "\n"
    raise ValueError(f"style={style!r} is not one of {STYLES}")


def extract_answer(text: str) -> Optional[int]:
    """The integer on the last `A: <int>` line, or None when there is none. Never evaluates text."""
    matches = _ANSWER_RE.findall(text)
    return int(matches[-1]) if matches else None


def verify(text: str, problem: Problem) -> bool:
    return extract_answer(text) == problem.answer
