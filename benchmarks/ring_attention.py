"""Ring attention on CPU (gloo): time per rank against the same work without a ring, and memory.

  python -m benchmarks.ring_attention        # from the repo root: docs/results_ring_attention.md
  python -m benchmarks.ring_attention --time-seq 2048 --mem-seqs 2048 4096   # a smoke run

Kernels: one process's causal fwd+bwd of a whole sequence with each block kernel (torch's SDPA
op, the PyTorch reference), best of --reps.
Time: causal fwd+bwd per rank at CP=2 and CP=4 (slowest rank), against (a) one process doing
one rank's work with the same block kernel, its zigzag shard of queries against the full KV, no
ring, while the other ranks wait (mean over ranks), and (b) all cp processes doing that at once,
which shares the cores as the ring does. The three alternate within each of --reps repetitions
and the best of each is kept: the machine is shared, and the least disturbed run repeats best.
Memory: peak resident memory above the baseline (inputs in place) during one fwd+bwd, per rank,
read from /proc (VmHWM after resetting it via clear_refs); large allocations go through mmap so
freed memory leaves RSS. Every process is fresh and uses one thread. Beside ring attention at
CP=1 and CP=4 (per kernel), the model's own CP=1 path: torch SDPA under autograd.
"""

import argparse
import functools
import gc
import os
import shutil
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.attention_block import KERNELS

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 1, 1, 32
SCALE = HEAD_DIM**-0.5


def _spawn(fn, nprocs: int, *args) -> list:
    """Run fn(rank, nprocs, port, queue, *args) on fresh processes; return what they put."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(fn, args=(nprocs, port, queue, *args), nprocs=nprocs, join=True)
    return [queue.get() for _ in range(nprocs)]


def _init(rank: int, world: int, port: int):
    """One thread per process; a gloo world when there is more than one rank."""
    torch.set_num_threads(1)
    if world == 1:
        return None
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    return dist.group.WORLD


def _inputs(seq: int, cp: int, rank: int, full_kv: bool):
    """This rank's q shard and dout, and its kv shard (or the full kv), fp32, seeded."""
    from parallel.context import zigzag_split

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, seq, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    dout = torch.randn_like(q)
    q, dout = (zigzag_split(t, cp, rank, dim=1) for t in (q, dout))
    if not full_kv:
        k, v = (zigzag_split(t, cp, rank, dim=1) for t in (k, v))
    return [t.contiguous().requires_grad_() for t in (q, k, v)] + [dout.contiguous()]


def _ring_step(q, k, v, dout, group, kernel) -> None:
    from parallel.ring_attention import ring_attention

    ring_attention(q, k, v, causal=True, group=group, kernel=kernel).backward(dout)
    q.grad = k.grad = v.grad = None


def _sdpa_step(q, k, v, dout, group, kernel) -> None:
    """The model's attention at CP=1 (SDPACoreAttention's call), [b, h, s, d] views."""
    out = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=SCALE)
    out.backward(dout.transpose(1, 2))
    q.grad = k.grad = v.grad = None


STEPS = {"ring": _ring_step, "sdpa": _sdpa_step}


def _local_step(q, k, v, dout, cp: int, rank: int, kernel: str = "sdpa") -> None:
    """One rank's causal work without a ring: each q chunk against the keys up to its end."""
    from parallel.ring_attention import attention_block_backward, attention_block_forward

    chunk = q.shape[1] // 2
    plan = ((slice(0, chunk), (rank + 1) * chunk), (slice(chunk, None), (2 * cp - rank) * chunk))
    for rows, keys in plan:
        qc, kc, vc = q.detach()[:, rows], k.detach()[:, :keys], v.detach()[:, :keys]
        out, lse = attention_block_forward(qc, kc, vc, SCALE, True, kernel=kernel)
        attention_block_backward(dout[:, rows], qc, kc, vc, out, lse, SCALE, True,
                                 kernel=kernel)


def _seconds(step, barrier) -> float:
    barrier()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _time_all(rank, world, port, queue, seq, reps):
    """Best times of: the ring; every rank's no-ring work at once; each rank's alone in turn.

    The three kinds alternate within each repetition, so load from outside hits them alike.
    """
    group = _init(rank, world, port)
    barrier = functools.partial(dist.barrier, group=group)
    ring = functools.partial(_ring_step, *_inputs(seq, world, rank, full_kv=False), group, "sdpa")
    local = functools.partial(_local_step, *_inputs(seq, world, rank, full_kv=True), world, rank)
    ring(), local()  # warm-up
    best = {"ring": float("inf"), "shared": float("inf"), "alone": float("inf")}
    for _ in range(reps):
        best["ring"] = min(best["ring"], _seconds(ring, barrier))
        best["shared"] = min(best["shared"], _seconds(local, barrier))
        for turn in range(world):
            barrier()
            if turn == rank:
                best["alone"] = min(best["alone"], _seconds(local, lambda: None))
        barrier()
    queue.put(best)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status; this benchmark needs Linux.")


def _kernel_times(rank, world, port, queue, seq, reps):
    """Best causal fwd+bwd time of a whole sequence, one process, per block kernel; the kernels
    alternate within each repetition."""
    _init(rank, world, port)
    inputs = _inputs(seq, 1, 0, full_kv=True)
    best = {}
    for _ in range(reps):
        for kernel in KERNELS:
            step = functools.partial(_local_step, *inputs, 1, 0, kernel)
            best[kernel] = min(best.get(kernel, float("inf")), _seconds(step, lambda: None))
    queue.put(best)


def _peak_memory(rank, world, port, queue, seq, what, kernel):
    group = _init(rank, world, port)
    step = STEPS[what]
    step(*_inputs(2 * world * 64, world, rank, full_kv=False), group, kernel)  # one-time costs
    q, k, v, dout = _inputs(seq, world, rank, full_kv=False)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    step(q, k, v, dout, group, kernel)
    queue.put((_status_kib("VmHWM") - base) / 1024)


def _line_fit(points):
    """Least-squares (intercept, slope) of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    return mean_y - slope * mean_x, slope


def _kernel_table(seq: int, reps: int) -> list:
    best = _spawn(_kernel_times, 1, seq, reps)[0]
    lines = [f"| causal fwd+bwd, seq {seq}, one process | {' | '.join(KERNELS)} |",
             "|---|" + "---|" * len(KERNELS),
             "| seconds | " + " | ".join(f"{best[k]:.2f}" for k in KERNELS) + " |",
             "| vs torch | " + " | ".join(f"{best[k] / best['torch']:.2f}" for k in KERNELS)
             + " |"]
    return lines


def _time_table(seq: int, reps: int) -> list:
    lines = [
        f"| fwd+bwd per rank, seq {seq}, sdpa kernel | ring (s) | one process, same work (s) "
        "| ratio | cp processes, same work, no ring (s) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for cp in (2, 4):
        ranks = _spawn(_time_all, cp, seq, reps)
        ring = max(r["ring"] for r in ranks)
        alone = statistics.mean(r["alone"] for r in ranks)
        shared = max(r["shared"] for r in ranks)
        lines.append(
            f"| CP={cp} | {ring:.2f} | {alone:.2f} | {ring / alone:.2f} | {shared:.2f} "
            f"| {ring / shared:.2f} |"
        )
    return lines


def _memory_table(seqs: list) -> list:
    lines = [
        "| seq | kernel | SDPA autograd, CP=1 (MiB) | ring, CP=1 (MiB) | ring per rank, CP=4 "
        "(MiB) | CP=4 / CP=1 (ring) |",
        "|---|---|---|---|---|---|",
    ]
    points = {(kernel, cp): [] for kernel in KERNELS for cp in (1, 4)}
    for seq in seqs:
        sdpa = _spawn(_peak_memory, 1, seq, "sdpa", None)[0]
        for kernel in KERNELS:
            one = _spawn(_peak_memory, 1, seq, "ring", kernel)[0]
            four = max(_spawn(_peak_memory, 4, seq, "ring", kernel))
            points[kernel, 1].append((seq, one))
            points[kernel, 4].append((seq // 4, four))
            lines.append(f"| {seq} | {kernel} | {sdpa:.1f} | {one:.1f} | {four:.1f} "
                         f"| {four / one:.2f} |")
    lines.append("")
    for (kernel, cp), cp_points in points.items() if len(seqs) > 1 else ():
        fixed, per_token = _line_fit(cp_points)
        worst = max(abs(y - fixed - per_token * x) / y for x, y in cp_points)
        lines.append(
            f"{kernel} kernel, CP={cp} fit, peak = a + b * seq/cp: a = {fixed:.1f} MiB, b = "
            f"{per_token * 1024:.2f} MiB per 1K tokens per rank; largest deviation {worst:.1%}."
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time-seq", type=int, default=16384, help="sequence length for timing")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (best is kept)")
    parser.add_argument("--mem-seqs", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    args = parser.parse_args()

    # Freed big buffers go back to the OS at once, so RSS follows live memory.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    tmp = tempfile.mkdtemp(prefix="bench_ring_")
    os.environ["TMPDIR"] = tmp  # torch and wandb leave folders there
    try:
        load_at_start = os.getloadavg()[0]
        header = (
            f"heads {HEADS} (kv {KV_HEADS}), head dim {HEAD_DIM}, batch {BATCH}, fp32, causal, "
            f"one thread per process, {len(os.sched_getaffinity(0))} cores"
        )
        lines = [header, ""] + _kernel_table(args.time_seq, args.reps) + [""]
        lines += _time_table(args.time_seq, args.reps) + [""]
        lines += _memory_table(args.mem_seqs)
        lines.append(
            f"1-minute load average of the machine (shared with other work): {load_at_start:.1f} "
            f"at the start, {os.getloadavg()[0]:.1f} at the end."
        )
        print("\n".join(lines))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
