"""Reading and writing trace files one line at a time, so sets larger than memory stream through.

A trace is a JSON object with string `prompt` and `response` and an optional `answer`. Every
problem with a line is reported as `path:line: what is wrong; how to fix it`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import IO, Iterable, Iterator, List, Optional


class TraceFormatError(ValueError):
    """A line of a trace file that is not a trace; the message starts with `path:line:`."""


@dataclasses.dataclass(frozen=True)
class Trace:
    line: int  # 1-based line number in the file it came from
    prompt: str
    response: str
    answer: Optional[str]  # the expected final answer, when the file gives one
    record: dict  # the whole JSON object, so the filter writes extra fields back unchanged


def _parse(path: str, line: int, raw: bytes) -> Trace:
    where = f"{path}:{line}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TraceFormatError(f"{where}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise TraceFormatError(f"{where}: a {type(record).__name__}, not a JSON object; each line must be "
                               '{"prompt": ..., "response": ...}')
    for key in ("prompt", "response"):
        if not isinstance(record.get(key), str):
            raise TraceFormatError(f"{where}: field {key!r} is {record.get(key)!r:.60}, not a string; "
                                   "each trace needs string 'prompt' and 'response' fields")
    answer = record.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int))):
        raise TraceFormatError(f"{where}: field 'answer' is {answer!r:.60}; it must be a string or an integer, or absent")
    return Trace(line, record["prompt"], record["response"], None if answer is None else str(answer), record)


def read_traces(path: str, malformed: Optional[List[str]] = None) -> Iterator[Trace]:
    """Yield the traces of a JSONL file in order, skipping blank lines.

    A malformed line raises TraceFormatError, unless a `malformed` list is given: then its
    message is appended there and reading goes on (so one bad line need not stop a large set).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield _parse(path, line, raw)
            except TraceFormatError as e:
                if malformed is None:
                    raise
                malformed.append(str(e))


def open_for_writing(path: str) -> IO[str]:
    """A UTF-8 text file for JSONL output; its folder is created when missing."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def to_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write one JSON object per line; returns how many were written."""
    n = 0
    with open_for_writing(path) as f:
        for record in records:
            f.write(to_line(record))
            n += 1
    return n
