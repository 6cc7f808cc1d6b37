"""Fused linear cross-entropy vs naive PyTorch (materialised logits) vs the chunked PyTorch
reference: peak memory and fwd+bwd time, as ratios to naive, in one table.

  python -m benchmarks.fused_ce           # from the repo root; CPU, h=64, fp32
  python -m benchmarks.fused_ce --device cuda --hidden 4096 --dtype bf16 --liger   # GPU

Memory: each (method, n, V) runs in a fresh process so one run's peak cannot hide another's;
the figure is the peak above the memory in use once the inputs exist, over the first fwd+bwd
at full size (after a tiny warm-up that takes the one-time inits). CPU reads VmHWM after
resetting it through /proc/self/clear_refs; CUDA reads torch.cuda.max_memory_allocated.
Time: one process per (n, V) runs the methods round-robin, --reps rounds after a warm-up
round, and keeps each method's best, so load from other processes hits all methods alike.
Naive runs whose predicted peak (3 fp32 [n, V] tensors: logits, log-softmax, their gradient)
exceeds --naive-budget-gb are not run; their figures are scaled linearly in n*V from the
largest naive run that was, and marked "est.".
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _loss_fn(method: str):
    """(hidden, weight, labels) -> scalar mean loss, for one method."""
    import torch.nn.functional as F

    from megatron_ext.ops import fused_linear_cross_entropy, set_backend

    if method == "naive":
        return lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y)
    if method == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )

        liger = LigerFusedLinearCrossEntropyLoss()

        def run(h, w, y):
            out = liger(w, h, y)
            return out[0] if isinstance(out, tuple) else out

        return run
    choice = "torch" if method == "reference" else None  # None: what serves by default

    def fused(h, w, y):
        set_backend(choice)
        return fused_linear_cross_entropy(h, w, y)

    return fused


class _Problem:
    """Seeded inputs on the device and one fwd+bwd step per method."""

    def __init__(self, n, vocab, hidden_size, dtype, device):
        import torch

        self.torch, self.on_cuda = torch, device == "cuda"
        torch.manual_seed(0)
        dt = getattr(torch, DTYPES[dtype])
        self.hidden = torch.randn(n, hidden_size, device=device).to(dt).requires_grad_()
        self.weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dt)
        self.weight.requires_grad_()
        self.labels = torch.randint(0, vocab, (n,), device=device)

    def step(self, loss_fn, small=False):
        h, w, y = self.hidden, self.weight, self.labels
        if small:  # one-time inits (thread pools, BLAS buffers) on a tiny problem
            h, w = h[:64].detach().requires_grad_(), w[:256].detach().requires_grad_()
            y = y[:64] % 256
        h.grad = w.grad = None
        loss_fn(h, w, y).backward()
        if self.on_cuda:
            self.torch.cuda.synchronize()


def worker_memory(args, method: str, n: int, vocab: int) -> dict:
    """Peak bytes of the first full-size fwd+bwd of one method, in this fresh process."""
    from megatron_ext.ops import backend

    problem, loss_fn = _Problem(n, vocab, args.hidden, args.dtype, args.device), _loss_fn(method)
    torch = problem.torch
    problem.step(loss_fn, small=True)
    if problem.on_cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _rss_kib("VmRSS") * 1024
    problem.step(loss_fn)
    used = torch.cuda.max_memory_allocated() if problem.on_cuda else _rss_kib("VmHWM") * 1024
    return {"peak": used - start, "backend": backend(), "threads": torch.get_num_threads()}


def worker_time(args, methods: list[str], n: int, vocab: int) -> dict:
    """Best fwd+bwd seconds of each method, run round-robin in this process."""
    problem = _Problem(n, vocab, args.hidden, args.dtype, args.device)
    loss_fns = {m: _loss_fn(m) for m in methods}
    best = dict.fromkeys(methods, float("inf"))
    for round_ in range(args.reps + 1):  # round 0 warms up
        for method, loss_fn in loss_fns.items():
            t0 = time.perf_counter()
            problem.step(loss_fn)
            if round_:
                best[method] = min(best[method], time.perf_counter() - t0)
    return best


def _run_worker(args, *job) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.fused_ce", "--worker", *map(str, job),
           "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
           "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, job))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=64, help="h (small on CPU)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's own)")
    parser.add_argument("--naive-budget-gb", type=float, default=None,
                        help="skip naive runs predicted above this (default: 8 on CPU, "
                             "60%% of GPU memory on CUDA)")
    parser.add_argument("--liger", action="store_true", help="add Liger-Kernel if it imports")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args()


def _naive_budget_bytes(args) -> float:
    if args.naive_budget_gb is not None:
        return args.naive_budget_gb * 2**30
    if args.device == "cuda":
        import torch

        return 0.6 * torch.cuda.get_device_properties(0).total_memory
    return 8 * 2**30


def main() -> None:
    args = _parse()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        kind, *job = args.worker
        if kind == "memory":
            result = worker_memory(args, job[0], int(job[1]), int(job[2]))
        else:
            result = worker_time(args, job[2:], int(job[0]), int(job[1]))
        print(json.dumps(result))
        return

    methods = ["fused", "reference"]
    if args.liger:
        try:
            import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401

            methods.append("liger")
        except ImportError as err:
            print(f"# Liger-Kernel skipped: {err}")
    budget = _naive_budget_bytes(args)
    load_before = os.getloadavg()[0]
    measured = {}  # (n, V) -> {method: {"peak", "seconds", ...}}
    for n in args.tokens:
        for v in args.vocab:
            runs = (["naive"] if 3 * n * v * 4 <= budget else []) + methods
            times = _run_worker(args, "time", n, v, *runs)
            measured[(n, v)] = {m: _run_worker(args, "memory", m, n, v) | {"seconds": times[m]}
                                for m in runs}
    naive_runs = {size: res["naive"] for size, res in measured.items() if "naive" in res}
    if not naive_runs:
        sys.exit(f"no naive run fits --naive-budget-gb={budget / 2**30:.1f}; raise it or add a "
                 "smaller --tokens/--vocab so the others can be scaled from it")
    (n0, v0), largest = max(naive_runs.items(), key=lambda kv: kv[0][0] * kv[0][1])

    first = next(iter(measured.values()))["fused"]
    print(f"# fused linear cross-entropy, fwd+bwd, device={args.device} h={args.hidden} "
          f"dtype={args.dtype} threads={first['threads']}; fused = '{first['backend']}' "
          f"backend; best of {args.reps}; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("| n | V | method | peak MiB | peak / naive | time s | time / naive |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for (n, v), results in measured.items():
        scale = n * v / (n0 * v0)
        base = results.get("naive") or {k: largest[k] * scale for k in ("peak", "seconds")}
        label = {"naive": "naive" if "naive" in results else "naive (est.)"}
        for method, res in ({"naive": base} | results).items():
            print(f"| {n} | {v} | {label.get(method, method)} | {res['peak'] / 2**20:.1f} | "
                  f"{res['peak'] / base['peak']:.4f} | {res['seconds']:.2f} | "
                  f"{res['seconds'] / base['seconds']:.2f} |")


if __name__ == "__main__":
    main()
