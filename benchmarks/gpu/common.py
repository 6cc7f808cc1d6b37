"""What the benchmarks/gpu/ pieces share: the device a run uses, a markdown table that also
lands in a file, relative errors and CUDA-event timing."""
from __future__ import annotations

import argparse
import time
from typing import Callable, List, Sequence

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes: checks the script itself (what the unit test runs)")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    return p


def device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("FAIL: no CUDA device visible; run with --dry-run on a CPU machine")
    return torch.device("cuda")


class Table:
    """Rows of a markdown table; `failed` is set by any row whose result starts with FAIL."""

    def __init__(self, title: str, columns: Sequence[str]):
        self.title, self.columns, self.rows, self.failed = title, list(columns), [], False

    def add(self, *cells) -> None:
        assert len(cells) == len(self.columns), (cells, self.columns)
        self.rows.append([str(c) for c in cells])
        self.failed |= str(cells[-1]).startswith("FAIL")
        print(" | ".join(self.rows[-1]), flush=True)  # progress, in case a later row hangs

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows]) + "\n"

    def finish(self, out: str | None) -> int:
        """Print (and write) the table; the exit code is 1 when a row failed."""
        text = self.markdown()
        print("\n" + text, flush=True)
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        return 1 if self.failed else 0


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in fp64)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def verdict(err: float, tol: float) -> str:
    return "ok" if err <= tol else f"FAIL (> {tol:g})"


def best_seconds(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Best wall time of fn over reps after warmup; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def run_train(overrides: Sequence[str], run_dir: str, timeout_s: int, dry_run: bool) -> dict:
    """One `python -m megatron_ext.train` process (world 1): its exit code, output, metrics
    records and NVML samples (run_dir/gpu_stats/*.jsonl)."""
    import glob
    import json
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "megatron_ext.train", "logging=none", f"run.dir={run_dir}",
            *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout_s}s"
    output = output if isinstance(output, str) else output.decode(errors="replace")

    def records(pattern):
        rows = []
        for path in sorted(glob.glob(os.path.join(run_dir, pattern))):
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        return rows

    return {"code": code, "output": output, "metrics": records("metrics.jsonl"),
            "gpu_stats": records("gpu_stats/*.jsonl")}


def last_line(output: str) -> str:
    """The last non-empty output line, for a FAIL cell."""
    lines = [line for line in output.splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:200].replace("|", "/") if lines else "(no output)"
