"""Reward functions by name, and their weighted sum from the config (`rl.rewards`).

A reward function maps (response text, problem) to a float; the problem is the built-in
task's `Problem`, or a JSONL record (data.problems.ProblemRecord: the line's dict, with its
"answer"). Besides the registered names, `rl.rewards` may name a user function by import path,
`mypkg.rewards:score`, called as `fn(response, record) -> float`. Model text is only scanned
and parsed (math-verify for `math`): nothing it contains is ever evaluated or executed.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch

from megatron_ext.data.task import extract_answer

RewardFn = Callable[[str, Any], float]
_REGISTRY: Dict[str, RewardFn] = {}

# The target format of the task (data.task.render, style "target"): one `l<op>r=v` line per
# step, then `A: <int>`, then nothing but an optional newline.
_STEP = r"-?\d+[+\-*]-?\d+=-?\d+"
_TARGET_FORMAT = re.compile(rf"(?:{_STEP}\n)+A: -?\d+\n?")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(response, problem) -> float` available as `name` in rl.rewards."""
    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered; pick another name")
        _REGISTRY[name] = fn
        return fn
    return add


def get_reward(name: str) -> RewardFn:
    """A registered reward, or `module:function` imported."""
    if ":" in name:
        module, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise ValueError(f"reward {name!r}: module {module!r} has no function {attr!r}; "
                             "give rl.rewards name as module:function")
        return fn
    if name not in _REGISTRY:
        raise KeyError(f"reward {name!r} is not registered; known: {', '.join(sorted(_REGISTRY))}"
                       " (add one with @register_reward)")
    return _REGISTRY[name]


@register_reward("task_correct")
def task_correct(response: str, problem: Any) -> float:
    """1 when the last `A: <int>` line equals the answer exactly, else 0 (missing or
    malformed answers included)."""
    return float(extract_answer(response) == problem.answer)


@register_reward("format")
def target_format(response: str, problem: Any) -> float:
    """1 when the whole response is step lines followed by a final `A: <int>` line, else 0.
    Only the shape is checked; `task_correct` judges the answer."""
    return float(_TARGET_FORMAT.fullmatch(response) is not None)


@register_reward("math")
def math_reward(response: str, problem: Any) -> float:
    """1 when the final answer (last \\boxed{...}, else `#### x`, else "the answer is x")
    equals the problem's answer by math-verify, else 0 (see rl.math_answer)."""
    from megatron_ext.rl.math_answer import math_correct
    return math_correct(response, problem["answer"] if isinstance(problem, Mapping)
                        else problem.answer)


def is_correct(response: str, problem: Any) -> float:
    """The pass-rate verifier: the task's exact integer check for its problems, math-verify
    for JSONL records."""
    return (math_reward(response, problem) if isinstance(problem, Mapping)
            else task_correct(response, problem))


class CombinedReward:
    """The weighted sum of named rewards, e.g. from `rl.rewards`:
    `[{"name": "task_correct", "weight": 1.0}, {"name": "format", "weight": 0.1}]`
    (mappings or objects with `name` and `weight`)."""

    def __init__(self, specs: Sequence[Any]):
        if not specs:
            raise ValueError("no rewards configured; give rl.rewards at least one {name, weight}")
        self.terms: List[Tuple[str, float, RewardFn]] = []
        for i, spec in enumerate(specs):
            name, weight = ((spec["name"], spec["weight"]) if isinstance(spec, Mapping)
                            else (spec.name, spec.weight))
            if not math.isfinite(float(weight)):
                raise ValueError(f"rl.rewards[{i}] ({name}) has weight {weight}; need a finite "
                                 "number")
            self.terms.append((name, float(weight), get_reward(name)))

    def score(self, responses: Sequence[str], problems: Sequence[Any]
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(total `[n]` fp32, {name: unweighted `[n]` fp32}) for n responses to n problems."""
        if len(responses) != len(problems):
            raise ValueError(f"{len(responses)} responses but {len(problems)} problems")
        parts = {name: torch.tensor([float(fn(r, p)) for r, p in zip(responses, problems)],
                                    dtype=torch.float32)
                 for name, _, fn in self.terms}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for name, weight, _ in self.terms:
            total += weight * parts[name]
        return total, parts
