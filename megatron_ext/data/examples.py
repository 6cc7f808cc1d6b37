"""Prompt/response examples as token ids with a loss mask, from the built-in task or JSONL."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator, List, Optional, Tuple, Union

from megatron_ext.data.task import ArithmeticTask


class DataError(ValueError):
    """Bad training data; the message names the file, the line and the fix."""


@dataclasses.dataclass
class Example:
    tokens: List[int]  # BOS? + prompt + response + EOS
    loss_mask: List[int]  # 1 where the token is a training target


def encode_example(tokenizer, prompt: str, response: str, loss_on_prompt: bool) -> Example:
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(prompt)
    tail = tokenizer.encode(response) + [tokenizer.eos_id]
    return Example(head + tail, [int(loss_on_prompt)] * len(head) + [1] * len(tail))


def jsonl_objects(path: str, parse: Callable[[dict], object], on_malformed: str = "error",
                  stats: Optional[dict] = None, key: str = "data.path") -> Iterator:
    """`parse(obj)` of each JSON object line of `path`. A malformed line (not JSON, not an
    object, or one `parse` refuses with ValueError) raises DataError naming file:line, or with
    on_malformed="skip" is counted in stats["skipped"] and passed over. `key` is the config
    field the path came from, for the messages."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist; check {key}")
    stats = stats if stats is not None else {}
    stats.setdefault("skipped", 0)
    with open(path, "rb") as f:  # decoded per line, so that bad UTF-8 is named by its line
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                item = parse(obj)
            except ValueError as err:
                if on_malformed == "skip":
                    stats["skipped"] += 1
                    continue
                raise DataError(f"{path}:{lineno}: malformed line ({err}); fix the line or "
                                "set data.on_malformed=skip") from None
            yield item


def _pair_or_messages(obj: dict) -> Union[Tuple[str, str], list]:
    if "messages" in obj:
        from megatron_ext.data.chat import check_messages  # chat imports Example
        return check_messages(obj["messages"])
    item = obj.get("prompt"), obj.get("response")
    if not all(isinstance(x, str) for x in item):
        raise ValueError('needs string fields "prompt" and "response"), or a "messages" list '
                         '(a chat')
    return item


def read_jsonl(path: str, on_malformed: str = "error",
               stats: Optional[dict] = None, key: str = "data.path"
               ) -> Iterator[Union[Tuple[str, str], list]]:
    """(prompt, response) pairs, or a chat record's messages list, of an SFT JSONL file."""
    return jsonl_objects(path, _pair_or_messages, on_malformed, stats, key)


def task_examples(task: ArithmeticTask, n: int, split: str = "train") -> List[Tuple[str, str]]:
    return [(p.prompt, p.response()) for p in task.take(n, split)]
