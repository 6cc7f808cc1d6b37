"""One decode step (a token for every row of a batch) of models/decode.py's ChunkDecoder
against megatron's StaticInferenceContext path (what models/generate.py ran), same process,
same weights, same batch.

  python -m benchmarks.decode_step                       # tiny preset, batch 128
  python -m benchmarks.decode_step --batch 16 --prompt 64 --threads 2 model=small

Both prefill the same prompts (--prompt tokens per row), then time --steps decode steps each;
the two alternate within each of --reps repetitions and the median step of each repetition's
best is kept (the machine may be shared: read the ratio, not the absolute times). ChunkDecoder
is timed as the engine calls it (kv_len given) and with kv_len computed from the positions.
The logits of the two paths are checked equal (1e-4) at every decode step timed.

  python -m benchmarks.decode_step --engine [--batches 1 16 128] [--lengths 32 256]

The engine (models/generate.py) with its decode passes at dynamic shapes (the CPU default)
against fixed shapes (models/decode_graph.py's row buckets, static buffers and whole-group
cache views, run eagerly with exact key lengths: what CUDA graphs replay on a GPU, but for
the key padding), same weights, the same 16-token prompts, sampled at temperature
1 to exactly the length limit; tokens/s of the whole drain, best of --reps, alternating; the
samples of both are checked equal.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _build(overrides):
    from megatron_ext import compat

    compat.setup()
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import build_gpt_chunks
    from parallel import topology

    cfg = compose_config(["logging=none", *overrides])
    topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
    chunks = build_gpt_chunks(cfg, topo, 259)
    for c in chunks:
        c.eval()
    return chunks[0], topology


def _megatron(model, tokens, prompt, steps):
    """Step times (s) of megatron's static-batch KV-cached forward; the last logits."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, device = tokens.size(0), tokens.device
    context = StaticInferenceContext(b, prompt + steps)
    with torch.no_grad():
        model(tokens[:, :prompt], torch.arange(prompt, device=device).expand(b, -1), None,
              inference_context=context, runtime_gather_output=True)
        context.sequence_len_offset += prompt
        times, out = [], []
        for cur in range(prompt, prompt + steps):
            start = time.perf_counter()
            logits = model(tokens[:, cur:cur + 1], torch.full((b, 1), cur, device=device), None,
                           inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset += 1
            times.append(time.perf_counter() - start)
            out.append(logits[:, -1].float())
    return times, out


def _ours(model, tokens, prompt, steps, engine_kv_len: bool):
    from megatron_ext.models.decode import ChunkDecoder, SlotCache

    b, device = tokens.size(0), tokens.device
    cache = SlotCache([model], b, prompt + steps)
    decoder = ChunkDecoder([model], cache)
    slots = torch.arange(b, device=device)
    ones = torch.ones(b, dtype=torch.long, device=device)
    decoder.forward(0, tokens[:, :prompt], slots, torch.arange(prompt, device=device).expand(b, -1),
                    torch.full((b,), prompt, device=device), kv_len=prompt)
    times, out = [], []
    for cur in range(prompt, prompt + steps):
        start = time.perf_counter()
        logits = decoder.forward(0, tokens[:, cur:cur + 1], slots,
                                 torch.full((b, 1), cur, device=device), ones,
                                 kv_len=cur + 1 if engine_kv_len else None)
        times.append(time.perf_counter() - start)
        out.append(logits)
    cache.release()
    return times, out


def _engine(model, prompts, length, fixed: bool):
    """(seconds, results) of the engine generating `length` tokens for each prompt."""
    from benchmarks.generation import NoEosTokenizer
    from megatron_ext.models.generate import Engine, SamplingParams

    engine = Engine([model], NoEosTokenizer(0), SamplingParams(length, temperature=1.0),
                    vocab_size=259, num_slots=len(prompts), max_len=len(prompts[0]) + length,
                    seed=1, fixed_shape=fixed)
    start = time.perf_counter()
    for p in prompts:
        engine.add_request(p)
    results = engine.drain()
    took = time.perf_counter() - start
    engine.release()
    assert all(len(r.tokens) == length for r in results)
    return took, results


def engine_table(model, args) -> None:
    print(f"engine decode shapes, {args.threads} thread(s), "
          f"{' '.join(args.overrides) or 'tiny preset'}, best of {args.reps}; tokens/s")
    print(f"  {'batch':>5} {'new':>4} {'dynamic':>9} {'fixed':>9} {'fixed/dynamic':>13}")
    for batch in args.batches:
        prompts = torch.randint(0, 256, (batch, 16),
                                generator=torch.Generator().manual_seed(0)).tolist()
        for length in args.lengths:
            best = {}
            for _ in range(args.reps):
                outs = {}
                for fixed in (False, True):
                    took, outs[fixed] = _engine(model, prompts, length, fixed)
                    best[fixed] = min(best.get(fixed, float("inf")), took)
                assert [r.tokens for r in outs[True]] == [r.tokens for r in outs[False]]
            rate = {k: batch * length / t for k, t in best.items()}
            print(f"  {batch:5d} {length:4d} {rate[False]:9.0f} {rate[True]:9.0f} "
                  f"{rate[True] / rate[False]:12.2f}x", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--engine", action="store_true",
                        help="the engine at dynamic vs fixed decode shapes (tokens/s)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=small")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, topology = _build(args.overrides)
    if args.engine:
        engine_table(model, args)
        topology.destroy()
        return
    tokens = torch.randint(0, 259, (args.batch, args.prompt + args.steps),
                           generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(next(model.parameters()).device)
    runs = {"megatron static": lambda: _megatron(model, tokens, args.prompt, args.steps),
            "ChunkDecoder": lambda: _ours(model, tokens, args.prompt, args.steps, True),
            "ChunkDecoder, kv_len=None": lambda: _ours(model, tokens, args.prompt, args.steps,
                                                       False)}
    best = {name: float("inf") for name in runs}
    for _ in range(args.reps):
        outs = {}
        for name, run in runs.items():
            times, outs[name] = run()
            best[name] = min(best[name], statistics.median(times))
        for name, out in outs.items():
            diff = max((a - b).abs().max().item() for a, b in zip(out, outs["megatron static"]))
            assert diff < 1e-4, f"{name} logits differ from megatron's by {diff:.3g}"
    base = best["megatron static"]
    print(f"decode step, batch {args.batch}, prompt {args.prompt}, {args.steps} steps, "
          f"{args.threads} thread(s), {' '.join(args.overrides) or 'tiny preset'}; median step "
          f"of the best of {args.reps} reps")
    for name, t in best.items():
        print(f"  {name:28s} {t * 1e3:8.2f} ms/step  {base / t:5.2f}x megatron's speed")
    topology.destroy()


if __name__ == "__main__":
    main()
