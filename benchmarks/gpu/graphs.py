"""Our engine's decode from CUDA graphs (generate.cuda_graphs=true, models/decode_graph.py)
against eager decode (false) on the very same weights: the tiny preset with random weights
(init std 0.2: peaked logits, no near-ties for greedy to flip on), world 1, greedy decoding of
16-token prompts to exactly the length limit (no EOS) at batch 1, 16 and 128. Prints whether
the tokens are equal, the largest log-prob difference over each row's agreeing prefix, and
tokens/s of both (the whole generate() call: prefill, capture, decode) with their ratio.

Tolerances: fp32 needs equal tokens and log-probs within 1e-5 (padding rows and keys change
the shapes a kernel runs, so the sums may round differently, as between the KV-cached and the
full forward); bf16 needs log-probs within 2e-2 on the agreeing prefix (bf16 logits round at
2^-8 relative) and reports token equality without failing on it.

  python -m benchmarks.gpu.graphs            # on a GPU
  python -m benchmarks.gpu.graphs --dry-run  # CPU: the fixed shapes run eagerly (no graphs)
"""
from __future__ import annotations

import sys
import time

import torch

from benchmarks.gpu.common import Table, device, parser

PROMPT_LEN = 16
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def compare(a, b) -> tuple:
    """(tokens equal, max |log-prob difference| over each row's agreeing response prefix)."""
    equal, diff = True, 0.0
    for x, y in zip(a, b):
        equal &= x.tokens == y.tokens
        same = next((j for j, (s, t) in enumerate(zip(x.tokens, y.tokens)) if s != t),
                    min(len(x.tokens), len(y.tokens)))
        diff = max([diff] + [abs(p - q) for p, q in zip(x.logprobs[:same], y.logprobs[:same])])
    return equal, diff


def rollout(chunks, prompts, length: int, graphs: bool, dry_run: bool):
    """(seconds, results) of one engine (built, drained, released) over the prompts."""
    from benchmarks.generation import NoEosTokenizer
    from megatron_ext.config.engine import resolve_cuda_graphs
    from megatron_ext.models.decode_graph import unsupported
    from megatron_ext.models.generate import Engine, SamplingParams

    options = dict(fixed_shape=True) if graphs and dry_run else dict(
        cuda_graphs=resolve_cuda_graphs(graphs, "cuda_graphs", unsupported(chunks)))
    sync = torch.cuda.synchronize if not dry_run else (lambda: None)
    sync()
    start = time.perf_counter()
    engine = Engine(chunks, NoEosTokenizer(0), SamplingParams(length, temperature=0),
                    vocab_size=259, num_slots=len(prompts), max_len=PROMPT_LEN + length,
                    **options)
    for p in prompts:
        engine.add_request(p)
    results = engine.drain()
    engine.release()
    sync()
    return time.perf_counter() - start, results


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args()
    dev = device(args.dry_run)
    if args.dry_run:
        args.batches, args.length, args.reps = [b for b in args.batches if b <= 16], 8, 1
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import build_gpt_chunks
    from parallel import topology

    compat.setup()
    label = "fixed shapes, eager (dry run)" if args.dry_run else "CUDA graphs"
    table = Table(f"Decode from CUDA graphs vs eager, greedy, same weights (tiny, world 1, "
                  f"{PROMPT_LEN}-token prompts, {args.length} new tokens, best of {args.reps} "
                  f"generate() calls, capture included; {dev.type})",
                  ["dtype", "batch", "eager tokens/s", f"{label} tokens/s", "ratio",
                   "tokens equal", "max abs logprob diff", "result"])
    for dtype in ("fp32", "bf16"):
        cfg = compose_config(["model=tiny", f"model.dtype={dtype}", "model.init_method_std=0.2",
                              "logging=none"])
        topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
        chunks = build_gpt_chunks(cfg, topo, 384)
        for c in chunks:
            c.eval()
        for batch in args.batches:
            prompts = torch.randint(0, 256, (batch, PROMPT_LEN),
                                    generator=torch.Generator().manual_seed(batch)).tolist()
            best, outs = {}, {}
            for rep in range(args.reps + 1):  # the first call of each side warms up
                for graphs in (False, True):
                    took, outs[graphs] = rollout(chunks, prompts, args.length, graphs,
                                                 args.dry_run)
                    if rep:
                        best[graphs] = min(best.get(graphs, float("inf")), took)
            equal, diff = compare(outs[True], outs[False])
            tol = TOLERANCE[dtype]
            ok = diff <= tol and (equal or dtype == "bf16")
            rate = {k: batch * args.length / t for k, t in best.items()}
            table.add(dtype, batch, f"{rate[False]:.0f}", f"{rate[True]:.0f}",
                      f"{rate[True] / rate[False]:.2f}x", "yes" if equal else "no",
                      f"{diff:.2e}", "ok" if ok else f"FAIL (tolerance {tol:g}"
                      f"{', tokens must be equal' if dtype == 'fp32' else ''})")
        topology.destroy()
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
