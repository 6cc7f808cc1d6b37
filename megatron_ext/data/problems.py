"""RL problems from JSONL (stage=rl data=jsonl): one record a line, `{"prompt": ...}` or
`{"messages": [...]}` (rendered by the tokenizer's chat template, ready for the assistant's
turn) plus `"answer"`; every other field rides along to the rewards."""
from __future__ import annotations

from typing import List, Tuple

from megatron_ext.data.examples import DataError, jsonl_objects


class ProblemRecord(dict):
    """The JSONL record itself (what a user reward receives), with the rendered `prompt` the
    policy sees and the reference `answer` as attributes (what the prompt pool and the
    verifier read)."""

    def __init__(self, record: dict, prompt: str):
        super().__init__(record)
        self.prompt = prompt

    @property
    def answer(self) -> str:
        return str(self["answer"])


def render_prompt(record: dict, tokenizer) -> str:
    """The prompt text of a record: "prompt" as is, or "messages" through the tokenizer's chat
    template with the generation prompt (the assistant's turn) appended."""
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError('"prompt" must be a string')
        return record["prompt"]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('needs "prompt" (a string) or "messages" (a list of {role, content})')
    if not hasattr(tokenizer, "apply_chat_template"):
        raise ValueError('has "messages" but data.tokenizer has no chat template; give a '
                         'tokenizer directory with one, or "prompt" records')
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_problems(path: str, tokenizer, on_malformed: str = "error",
                  key: str = "data.path") -> Tuple[List[ProblemRecord], int]:
    """(records, malformed lines skipped). A malformed line raises DataError naming file:line,
    unless on_malformed="skip"."""
    def parse(obj: dict) -> ProblemRecord:
        if "answer" not in obj:
            raise ValueError('needs an "answer" field for the verifier')
        return ProblemRecord(obj, render_prompt(obj, tokenizer))

    stats: dict = {}
    records = list(jsonl_objects(path, parse, on_malformed, stats, key))
    skipped = stats["skipped"]
    if not records:
        raise DataError(f"{key}={path!r} holds no problem ({skipped} malformed lines skipped); "
                        'give {"prompt": ..., "answer": ...} lines')
    return records, skipped


def rl_problems(cfg, tokenizer) -> Tuple[List, List]:
    """(training problems, held-out problems) of stage=rl: the built-in task's, or the JSONL
    files data.path and data.valid_path."""
    d = cfg.data
    if d.source == "jsonl":
        train, _ = read_problems(d.path, tokenizer, d.on_malformed)
        held, _ = read_problems(d.valid_path, tokenizer, d.on_malformed, "data.valid_path")
        return train, held
    from megatron_ext.data.task import ArithmeticTask
    t = d.task
    task = ArithmeticTask(t.seed, t.min_ops, t.max_ops, t.max_operand)
    return task.take(d.num_samples, "train"), task.take(cfg.train.eval_samples, "heldout")
