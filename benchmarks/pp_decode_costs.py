"""Where the time of a pipelined decode tick goes: the cost terms behind the PP2/PP1 ratio of
`benchmarks/generation.py --only pp`, on the same model (the tiny Llama shape, one thread per
process).

    python -m benchmarks.pp_decode_costs [--batch 16] [--length 128]

1. The decoder's cost per call (models/decode.py, one process): the embedding + output layer
   alone, and with 2 and 4 of the layers, at 8, 16, 64 and 128 rows: a layer's fixed cost and
   its cost per row (is a pass of half the rows any cheaper?).
2. The cost of idling: the same 2-layer call back to back, after a 1 ms sleep, and after a 1 ms
   busy wait (a pipeline stage that waits for its input sleeps in gloo's wait).
3. gloo's ring exchange between 2 processes (parallel/p2p.ring_shift): posting it, and the
   whole round trip.
4. The engine per tick at PP=1 and at PP=2 with G=2 and G=1 slot groups in flight: wall time
   per call of each phase (decoder, sampling, posting the message, waiting for it, the
   finished-row check, scheduling, packing and unpacking), by rank.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, n: int, between=None) -> float:
    """Mean seconds of fn() over n calls after 20 warm-up calls; between() runs untimed."""
    for _ in range(20):
        fn()
    took = 0.0
    for _ in range(n):
        if between is not None:
            between()
        start = time.perf_counter()
        fn()
        took += time.perf_counter() - start
    return took / n


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _decode_inputs(n: int, device):
    """ChunkDecoder arguments of one decode token for each of n slots at position 40, on the
    model's device."""
    return (torch.randint(0, 256, (n, 1), device=device), torch.arange(n, device=device),
            torch.full((n, 1), 40, device=device), torch.ones(n, dtype=torch.long, device=device))


def _decoder_worker(rank, world, hf_dir):
    from benchmarks.generation import build_ours
    from megatron_ext.models.decode import ChunkDecoder, SlotCache
    torch.set_num_threads(1)
    chunks, _, _ = build_ours(hf_dir, 1, 1)
    chunks[0].eval()
    device = next(chunks[0].parameters()).device
    print("1. decoder call, one decode token per row at position 40 (us):")
    for n in (8, 16, 64, 128):
        decoder = ChunkDecoder(chunks, SlotCache(chunks, n, 200))
        every = decoder.layers[0]
        ids, slots, positions, lengths = _decode_inputs(n, device)
        cost = {}
        for k in (0, 2, 4):
            decoder.layers[0] = every[:k]
            cost[k] = 1e6 * _time(lambda: decoder(0, ids, slots, positions, lengths, 41), 200)
        decoder.layers[0] = every
        print(f"   rows {n:>3}: embedding + output {cost[0]:5.0f}, + 2 layers {cost[2]:5.0f}, "
              f"+ 4 layers {cost[4]:5.0f}; a layer {(cost[4] - cost[2]) / 2:4.0f}")
    n = 16
    decoder = ChunkDecoder(chunks, SlotCache(chunks, n, 200))
    decoder.layers[0] = decoder.layers[0][:2]
    ids, slots, positions, lengths = _decode_inputs(n, device)
    call = lambda: decoder(0, ids, slots, positions, lengths, 41)  # noqa: E731
    print("2. the same 2-layer call on 16 rows (us): "
          f"back to back {1e6 * _time(call, 300):.0f}, after a 1 ms sleep "
          f"{1e6 * _time(call, 300, lambda: time.sleep(1e-3)):.0f}, after a 1 ms busy wait "
          f"{1e6 * _time(call, 300, lambda: _busy(1e-3)):.0f}", flush=True)


def _p2p_worker(rank, world):
    import torch.distributed as dist

    from parallel.p2p import ring_shift
    torch.set_num_threads(1)
    group = dist.new_group(list(range(world)))
    message = torch.zeros(16 * 64 * 4, dtype=torch.uint8)  # 16 rows of hidden 64, fp32
    post = whole = 0.0
    dist.barrier(group=group)
    for i in range(550):
        start = time.perf_counter()
        pending = ring_shift(message, group, received=torch.empty_like(message))
        posted = time.perf_counter()
        pending.wait()
        if i >= 50:
            post, whole = post + posted - start, whole + time.perf_counter() - start
    if rank == 0:
        print(f"3. gloo ring exchange of 4 KiB (us): post {post / 500 * 1e6:.0f}, round trip "
              f"{whole / 500 * 1e6:.0f}", flush=True)


PHASES = ("step", "decoder", "_sample", "ring_shift", "wait", "_check", "_schedule", "_pack",
          "_unpack")


def _engine_worker(rank, world, hf_dir, batch, length, groups, lines):
    """The per-phase profile of one engine drain, each phase wrapped in perf_counter."""
    import torch.distributed as dist

    import megatron_ext.models.generate as generate
    import parallel.p2p as p2p
    from benchmarks.generation import build_ours, prompts_for, run_engine
    torch.set_num_threads(1)
    chunks, topo, vocab = build_ours(hf_dir, world, world)
    group = topo.pp_group if world > 1 else None
    spent, calls = collections.defaultdict(float), collections.defaultdict(int)

    def timed(owner, name, key):
        inner = getattr(owner, name)

        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
                calls[key] += 1
        setattr(owner, name, run)
    for name in ("step", "_sample", "_check", "_schedule", "_unpack"):
        timed(generate.Engine, name, name)
    timed(generate.ChunkDecoder, "__call__", "decoder")
    timed(generate, "ring_shift", "ring_shift")
    timed(generate, "_pack", "_pack")
    timed(p2p.PendingShift, "wait", "wait")
    prompts = prompts_for(batch)
    run_engine(chunks, prompts, 4, vocab, group, groups)  # warm-up
    spent.clear(), calls.clear()
    if world > 1:
        dist.barrier()
    took = run_engine(chunks, prompts, length, vocab, group, groups)
    ticks = calls["step"]
    parts = ", ".join(f"{k.strip('_')} {spent[k] / ticks * 1e6:.0f}" for k in PHASES[1:]
                      if calls[k])
    row = (f"   PP={world}{f' G={groups}' if world > 1 else ''} rank {rank}: "
           f"{batch * length / took:,.0f} tok/s, {ticks} ticks of {took / ticks * 1e6:.0f} us:"
           f" {parts}")
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, row)
    else:
        gathered = [row]
    if rank == 0:
        torch.save(gathered, lines)
    if world > 1:
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from benchmarks.generation import make_hf_folder
    from tests.dist._spawn import run_distributed
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_pp_costs_") as tmp:
        hf_dir = os.path.join(tmp, "hf")
        make_hf_folder(hf_dir)
        run_distributed(_decoder_worker, 1, hf_dir)
        run_distributed(_p2p_worker, 2)
        print(f"4. the engine, batch {args.batch}, {args.length} new tokens, per tick (us; "
              "a tick of PP=1 is one token per row, of PP=2 half a round):")
        lines = os.path.join(tmp, "lines.pt")
        for world, groups in ((1, None), (2, 2), (2, 1)):
            run_distributed(_engine_worker, world, hf_dir, args.batch, args.length, groups,
                            lines, timeout_s=600)
            print("\n".join(torch.load(lines)), flush=True)
    print(f"load average before {load:.1f}, after {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
