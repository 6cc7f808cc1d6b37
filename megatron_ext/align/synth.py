"""Trace files from the built-in arithmetic task, in any of its rendering styles (demos, tests)."""
from __future__ import annotations

from typing import List

from megatron_ext.align.jsonl import write_jsonl
from megatron_ext.data.task import STYLES, ArithmeticTask, render


def make_traces(n: int, style: str = "target", *, seed: int = 0, min_ops: int = 1, max_ops: int = 2,
                max_operand: int = 9, split: str = "train", start: int = 0) -> List[dict]:
    """n records {"prompt", "response", "answer", "style"}: the task's problems solved in `style`."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {STYLES}")
    task = ArithmeticTask(seed=seed, min_ops=min_ops, max_ops=max_ops, max_operand=max_operand)
    return [{"prompt": p.prompt, "response": render(p, style), "answer": p.answer, "style": style}
            for p in task.take(n, split=split, start=start)]


def write_traces(path: str, n: int, style: str = "target", **task_kwargs) -> int:
    return write_jsonl(path, make_traces(n, style, **task_kwargs))
