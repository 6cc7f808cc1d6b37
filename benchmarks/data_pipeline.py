"""Data pipeline costs, in one run: preprocess throughput (tokens/s, per worker) and the
data=indexed loader's time per optimizer step against a plain np.memmap read of as many
tokens, and against a training step of the model preset (goal: loader < 2% of a `small` step
on CPU). Timings on a shared machine are noisy; the ratios are what to read.

    .venv/bin/python benchmarks/data_pipeline.py [--docs 20000] [--model small] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import time

import numpy


def corpus(path: str, docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 400)))})
                    + "\n")


def loader_times(source, prefix: str, steps: int, gbs: int, seq: int, seed: int):
    """(seconds per step of IndexedSamples.batch, of np.memmap reads of as many tokens)."""
    from megatron_ext.data.sampler import GlobalBatchSampler
    sampler = GlobalBatchSampler(len(source), gbs, gbs, 0, 1, seed)
    start = time.perf_counter()
    for _ in range(steps):
        for mb in sampler.next_step():
            source.batch(mb)
    ours = (time.perf_counter() - start) / steps
    data = numpy.memmap(prefix + ".bin", dtype=numpy.uint16, mode="r")
    rng = numpy.random.default_rng(seed)
    import torch
    start = time.perf_counter()
    for _ in range(steps):
        offsets = rng.integers(0, len(data) - seq - 1, gbs)
        torch.from_numpy(numpy.stack([data[o:o + seq + 1] for o in offsets]).astype(numpy.int64))
    return ours, (time.perf_counter() - start) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="small")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="model steps timed (after one warm-up)")
    args = ap.parse_args()
    from megatron_ext.data.preprocess import preprocess

    tmp = tempfile.mkdtemp(prefix="mext-data-bench-")
    src = os.path.join(tmp, "corpus.jsonl")
    corpus(src, args.docs)
    print(f"corpus: {args.docs} documents, {os.path.getsize(src) / 2**20:.1f} MiB; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| preprocess workers | tokens | seconds | tokens/s | tokens/s per worker |")
    print("|---:|---:|---:|---:|---:|")
    prefix = os.path.join(tmp, "corpus")
    for w in args.workers:
        s = preprocess([src], "text", "byte", prefix, workers=w)
        rate = s["tokens"] / s["seconds"]
        print(f"| {w} | {s['tokens']:,} | {s['seconds']:.1f} | {rate:,.0f} | {rate / w:,.0f} |")

    import torch.distributed as dist
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    cfg = compose_config(["stage=pretrain", "data=indexed", f"data.blend=[{prefix}]",
                          f"model={args.model}", "logging=none", f"train.seq_len={args.seq}",
                          f"train.micro_batch_size={args.gbs}",
                          f"train.global_batch_size={args.gbs}", f"train.steps={args.steps + 1}",
                          f"run.dir={tmp}/run"])
    dims = validate(cfg, 1)
    compat.setup()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
    topo = topology.initialize(dims, seed=cfg.seed)
    from megatron_ext.sft.recipe import SFTRecipe
    recipe = SFTRecipe(cfg, topo, log=lambda line: None)
    recipe.train_step(1)  # warm-up
    start = time.perf_counter()
    for step in range(2, args.steps + 2):
        recipe.train_step(step)
    step_s = (time.perf_counter() - start) / args.steps
    ours, plain = loader_times(recipe.train_rows, prefix, 20, args.gbs, args.seq, cfg.seed)
    topology.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"\nmodel={args.model}, seq {args.seq}, global batch {args.gbs}, CPU, mean of "
          f"{args.steps} steps after a warm-up")
    print("| per optimizer step | ms | share of a training step |")
    print("|---|---:|---:|")
    print(f"| training step (loader included) | {step_s * 1e3:,.1f} | 100% |")
    print(f"| data=indexed loader (GPTDataset via megatron's builder) | {ours * 1e3:,.2f} | "
          f"{ours / step_s:.3%} |")
    print(f"| plain np.memmap read of as many tokens | {plain * 1e3:,.2f} | "
          f"{plain / step_s:.3%} |")


if __name__ == "__main__":
    main()
