"""Fused linear cross-entropy vs naive PyTorch (materialised logits) vs the chunked PyTorch
reference: peak memory and fwd+bwd time, as ratios to naive, in one table.

  python -m benchmarks.fused_ce           # from the repo root; CPU, h=64, fp32
  python -m benchmarks.fused_ce --device cuda --hidden 4096 --dtype bf16 --liger   # GPU

Every (method, n, V) runs in a fresh process so one run's peak cannot hide another's. Peak
memory is above the memory in use once inputs exist: CPU reads VmHWM after resetting it via
/proc/self/clear_refs, CUDA reads torch.cuda.max_memory_allocated, both over the first fwd+bwd
at full size (after a tiny warm-up that takes the one-time inits). Time is the best of --reps
further runs. Naive runs whose predicted peak (3 fp32 [n, V] tensors: logits, log-softmax,
their gradient) exceeds --naive-budget-gb are not run; their figures are scaled linearly in
n*V from the largest naive run that was, and marked "est.".
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
    """fwd of one method: (hidden, weight, labels) -> scalar mean loss."""
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
    set_backend("torch" if method == "reference" else None)
    return fused_linear_cross_entropy


def worker(method: str, n: int, vocab: int, hidden_size: int, dtype: str, device: str,
           reps: int) -> dict:
    """One method at one size in this (fresh) process: {"peak": bytes, "seconds": best}."""
    import torch

    from megatron_ext.ops import backend

    on_cuda = device == "cuda"
    torch.manual_seed(0)
    dt = getattr(torch, DTYPES[dtype])
    hidden = torch.randn(n, hidden_size, device=device).to(dt).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dt)
    weight.requires_grad_()
    labels = torch.randint(0, vocab, (n,), device=device)
    loss_fn = _loss_fn(method)

    def step(h=hidden, w=weight, y=labels):
        h.grad = w.grad = None
        loss_fn(h, w, y).backward()
        if on_cuda:
            torch.cuda.synchronize()

    step(hidden[:64].detach().requires_grad_(), weight[:256].detach().requires_grad_(),
         labels[:64] % 256)  # one-time inits (thread pools, BLAS buffers) out of the figure
    # Memory from the first full-size run: later runs reuse pages the allocator kept, which
    # RSS would not show again.
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _rss_kib("VmRSS") * 1024
    step()
    used = torch.cuda.max_memory_allocated() if on_cuda else _rss_kib("VmHWM") * 1024
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return {"peak": used - start, "seconds": best, "backend": backend(),
            "threads": torch.get_num_threads()}


def _run_worker(args, method, n, vocab) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.fused_ce", "--worker", method, str(n), str(vocab),
           "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device,
           "--reps", str(args.reps)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} n={n} V={vocab} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _estimate(naive: dict, n: int, vocab: int) -> dict:
    """Scale the largest measured naive run linearly in n*V."""
    (n0, v0), base = max(naive.items(), key=lambda kv: kv[0][0] * kv[0][1])
    factor = n * vocab / (n0 * v0)
    return {"peak": base["peak"] * factor, "seconds": base["seconds"] * factor, "est": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=64, help="h (small on CPU)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's own)")
    parser.add_argument("--naive-budget-gb", type=float, default=None,
                        help="skip naive runs predicted above this (default: 8 on CPU, "
                             "60%% of GPU memory on CUDA)")
    parser.add_argument("--liger", action="store_true", help="add Liger-Kernel if it imports")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        method, n, vocab = args.worker[0], int(args.worker[1]), int(args.worker[2])
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(method, n, vocab, args.hidden, args.dtype, args.device,
                                args.reps)))
        return

    budget = args.naive_budget_gb
    if budget is None:
        if args.device == "cuda":
            import torch

            budget = 0.6 * torch.cuda.get_device_properties(0).total_memory / 2**30
        else:
            budget = 8.0
    methods = ["fused", "reference"]
    if args.liger:
        try:
            import liger_kernel.transformers.fused_linear_cross_entropy  # noqa: F401

            methods.append("liger")
        except ImportError as err:
            print(f"# Liger-Kernel skipped: {err}")

    sizes = [(n, v) for n in args.tokens for v in args.vocab]
    load_before = os.getloadavg()[0]
    naive = {}
    for n, v in sorted(sizes, key=lambda s: s[0] * s[1]):
        if 3 * n * v * 4 <= budget * 2**30:
            naive[(n, v)] = _run_worker(args, "naive", n, v)
    if not naive:
        sys.exit(f"no naive run fits --naive-budget-gb={budget:.1f}; raise it or add a smaller "
                 "--tokens/--vocab so the others can be scaled from it")
    rows = []
    for n, v in sizes:
        base = naive.get((n, v)) or _estimate(naive, n, v)
        results = {"naive": base} | {m: _run_worker(args, m, n, v) for m in methods}
        for method, res in results.items():
            rows.append((n, v, method, res, base))

    fused_backend = rows[1][3]["backend"]
    threads = rows[1][3]["threads"]
    print(f"# fused linear cross-entropy, fwd+bwd, device={args.device} h={args.hidden} "
          f"dtype={args.dtype} threads={threads}; fused = '{fused_backend}' backend; "
          f"best of {args.reps}; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print("| n | V | method | peak MiB | peak / naive | time s | time / naive |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n, v, method, res, base in rows:
        est = " (est.)" if res.get("est") else ""
        print(f"| {n} | {v} | {method}{est} | {res['peak'] / 2**20:.1f} | "
              f"{res['peak'] / base['peak']:.4f} | {res['seconds']:.2f} | "
              f"{res['seconds'] / base['seconds']:.2f} |")


if __name__ == "__main__":
    main()
