"""The loss at n=16K tokens, V=128K, h=4096, bf16: our fused linear cross-entropy vs megatron's
vocab-parallel cross-entropy on materialised logits (what model.fused_loss=false and the GPU
fallback of auto run) vs Liger-Kernel's fused linear CE (when it imports). fwd+bwd time (best
of 3) and peak memory above the inputs, in one process (CUDA's peak counter resets per method).

  python -m benchmarks.gpu.loss            # on a GPU
  python -m benchmarks.gpu.loss --dry-run  # CPU, tiny shapes (peak memory not measured)
"""
from __future__ import annotations

import sys

import torch

from benchmarks.fused_ce import _loss_fn, _Problem
from benchmarks.gpu.common import Table, best_seconds, device, parser
from megatron_ext import compat


def _megatron_loss(fused: bool):
    """(hidden, weight, labels) -> mean loss the way GPTModel computes it: logits from the
    output layer's matmul, then megatron's cross-entropy (native fused or not) in fp32."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if fused:
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    def run(h, w, y):
        logits = (h @ w.t()).unsqueeze(1)  # [s, b=1, V], as megatron's layout
        labels = y.unsqueeze(1)
        if fused:
            loss = fused_vocab_parallel_cross_entropy(logits, labels,
                                                      ps.get_tensor_model_parallel_group())
        else:
            loss = vocab_parallel_cross_entropy(logits, labels)
        return loss.mean()

    return run


def _methods(table: Table, dry_run: bool):
    methods = {"ours (fused linear CE)": _loss_fn("fused"),
               "megatron vocab-parallel CE": _megatron_loss(fused=False)}
    if dry_run:  # torch.compile on CPU takes minutes here
        table.add("megatron native fused CE", "-", "-", "-", "-", "skip (dry run: torch.compile)")
    else:
        try:
            methods["megatron native fused CE"] = _megatron_loss(fused=True)
        except ImportError as err:
            table.add("megatron native fused CE", "-", "-", "-", "-", f"skip ({err})")
    if compat.has_module("liger_kernel"):
        methods["Liger fused linear CE"] = _loss_fn("liger")
    else:
        table.add("Liger fused linear CE", "-", "-", "-", "-",
                  "skip (liger_kernel does not import)")
    return methods


def main() -> int:
    args = parser(__doc__).parse_args()
    dev = device(args.dry_run)
    n, v, h = (512, 4096, 64) if args.dry_run else (16384, 131072, 4096)
    dtype = "fp32" if args.dry_run else "bf16"
    compat.setup()
    from parallel import topology
    from parallel.topology import ParallelDims

    topology.initialize(ParallelDims(world_size=1, tp=1, pp=1, cp=1), seed=0)
    table = Table(f"Loss fwd+bwd, n={n} V={v} h={h} {dtype} ({dev.type})",
                  ["method", "ms", "time / ours", "peak GiB", "peak / ours", "result"])
    try:
        problem = _Problem(n, v, h, dtype, dev.type)
        results = {}
        for name, fn in _methods(table, args.dry_run).items():
            try:
                problem.step(fn, small=True)  # one-time inits
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                seconds = best_seconds(lambda: problem.step(fn), dev, reps=1 if args.dry_run else 3)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" \
                    else float("nan")
                results[name] = (seconds, peak)
            except Exception as err:  # noqa: BLE001 - OOM or a broken method is its row
                table.add(name, "-", "-", "-", "-", f"FAIL ({type(err).__name__}: "
                          + " ".join(str(err).split())[:160] + ")")
        ours = results.get("ours (fused linear CE)")
        for name, (seconds, peak) in results.items():
            measured = peak == peak  # NaN on CPU
            table.add(name, f"{seconds * 1e3:.1f}", f"{seconds / ours[0]:.2f}" if ours else "-",
                      f"{peak:.2f}" if measured else "n/a",
                      f"{peak / ours[1]:.2f}" if measured and ours and ours[1] > 0 else "-", "ok")
    finally:
        topology.destroy()
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
