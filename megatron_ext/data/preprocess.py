"""`python -m megatron_ext.data.preprocess`: a JSONL corpus to megatron's IndexedDataset pair
(PREFIX.bin, PREFIX.idx), written by megatron-core's own IndexedDatasetBuilder, so that
pretraining memory-maps the tokens instead of tokenising a corpus at every start.

Each line is a JSON object; its `--json-key` string is one document: its tokens, then EOS.
Tokenisation runs in `--workers` processes, in order, so the output does not depend on N."""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator, List, Optional, Tuple

import numpy
from megatron.core.datasets.indexed_dataset import (DType, IndexedDatasetBuilder, get_bin_path,
                                                    get_idx_path)

from megatron_ext.data.examples import DataError
from megatron_ext.data.tokenizer import build_tokenizer

_TOKENIZER = None  # one per worker process, built by _init_worker


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = build_tokenizer(spec)


def parse_line(raw: bytes, key: str) -> Optional[str]:
    """The document text of one JSONL line; None for a blank line; ValueError if malformed."""
    if not raw.strip():
        return None
    obj = json.loads(raw.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    text = obj.get(key)
    if not isinstance(text, str):
        raise ValueError(f"needs a string field {key!r}")
    return text


def _encode(item: Tuple[int, bytes, str]) -> Tuple[int, Optional[List[int]], str]:
    """(line number, tokens + EOS or None for a blank line, error message or "")."""
    lineno, raw, key = item
    try:
        text = parse_line(raw, key)
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return lineno, None, str(err)
    if text is None:
        return lineno, None, ""
    return lineno, _TOKENIZER.encode(text) + [_TOKENIZER.eos_id], ""


def _lines(path: str, key: str) -> Iterator[Tuple[int, bytes, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw, key


@contextlib.contextmanager
def _encoder(tokenizer: str, workers: int):
    """`encode(items)` in order: in this process for one worker, else in a pool of spawned
    processes (a forked child of a process with threads, e.g. torch's, can deadlock)."""
    if workers <= 1:
        _init_worker(tokenizer)
        yield lambda items: map(_encode, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool:
        yield lambda items: pool.imap(_encode, items, chunksize=64)


def preprocess(inputs: List[str], key: str, tokenizer: str, prefix: str, workers: int = 1,
               on_malformed: str = "error", progress=None) -> dict:
    """Write PREFIX.bin/.idx from the JSONL files `inputs`; return the summary (documents,
    tokens, skipped lines, seconds). A malformed line raises DataError naming file:line, or
    with on_malformed="skip" is counted and passed over."""
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"--input {path!r} does not exist; give a JSONL file")
    vocab = build_tokenizer(tokenizer).vocab_size
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=DType.optimal_dtype(vocab))
    docs = tokens = skipped = 0
    start = time.perf_counter()
    with _encoder(tokenizer, workers) as encode:
        for path in inputs:
            for lineno, ids, error in encode(_lines(path, key)):
                if error:
                    if on_malformed != "skip":
                        raise DataError(f"{path}:{lineno}: malformed line ({error}); fix the "
                                        "line or pass --on-malformed skip")
                    skipped += 1
                    continue
                if ids is None:
                    continue
                builder.add_document(numpy.asarray(ids), [len(ids)])
                docs, tokens = docs + 1, tokens + len(ids)
                if progress is not None and docs % 10_000 == 0:
                    progress(docs, tokens, time.perf_counter() - start)
    if docs == 0:
        builder.data_file.close()
        os.remove(get_bin_path(prefix))
        raise DataError(f"{', '.join(inputs)}: no document with a string {key!r} field "
                        f"({skipped} malformed lines skipped); check --json-key")
    builder.finalize(get_idx_path(prefix))
    return {"documents": docs, "tokens": tokens, "skipped": skipped,
            "seconds": time.perf_counter() - start, "workers": max(workers, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m megatron_ext.data.preprocess",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="JSONL file(s)")
    ap.add_argument("--json-key", default="text", help="the field that holds a document")
    ap.add_argument("--tokenizer", default="byte", help="byte, or a tokenizer.json path")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--workers", type=int, default=1, help="tokenising processes")
    ap.add_argument("--on-malformed", choices=("error", "skip"), default="error")
    args = ap.parse_args(argv)

    def progress(docs, toks, secs):
        print(f"\r{docs:,} documents, {toks:,} tokens, {toks / max(secs, 1e-9):,.0f} tokens/s",
              end="", file=sys.stderr, flush=True)

    try:
        s = preprocess(args.input, args.json_key, args.tokenizer, args.output_prefix,
                       args.workers, args.on_malformed, progress)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"\npreprocess: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(f"\nwrote {args.output_prefix}.bin/.idx: {s['documents']:,} documents, "
          f"{s['tokens']:,} tokens, {s['skipped']} malformed lines skipped, "
          f"{s['seconds']:.1f} s ({s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s, "
          f"{s['workers']} workers)", flush=True)
    return s


if __name__ == "__main__":
    main()
