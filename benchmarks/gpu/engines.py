"""Our generation engine against megatron-core's DynamicInferenceEngine (generate.engine=ours vs
megatron, models/megatron_engine.py) on the very same weights: the tiny preset in bf16 with
random weights, world 1, greedy decoding of prompts of different lengths. Prints whether the
tokens are equal and the largest log-prob difference over the tokens both produced alike (up
to a row's first disagreement). Only where flash-attn >= 2.7.3 imports on CUDA; elsewhere (the
CPU dry run included) ours runs alone and the megatron row says why it was skipped.

  python -m benchmarks.gpu.engines            # on a GPU
  python -m benchmarks.gpu.engines --dry-run  # CPU
"""
from __future__ import annotations

import sys

import torch

from benchmarks.gpu.common import Table, parser

PROMPT_LENS = (3, 17, 40, 9)
MAX_NEW = 24
LOGPROB_TOL = 5e-2  # bf16 logits through two attention kernels


def compare(ours, theirs) -> tuple:
    """(tokens equal, max |log-prob difference| over each row's agreeing response prefix)."""
    equal, diff = True, 0.0
    for i in range(len(ours.texts)):
        start = int(ours.prompt_lens[i])
        a = ours.tokens[i, start:start + int(ours.response_lens[i])].tolist()
        b = theirs.tokens[i, start:start + int(theirs.response_lens[i])].tolist()
        equal &= a == b
        same = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if same:
            gap = ours.logprobs[i, start:start + same] - theirs.logprobs[i, start:start + same]
            diff = max(diff, gap.abs().max().item())
    return equal, diff


def skipped(dry_run: bool):
    """Why the megatron row cannot run here (None: it can)."""
    from megatron_ext.config.engine import environment_missing
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn not installed"
    if dry_run:
        return "dry run (CPU)"
    missing = environment_missing()
    return None if missing is None else f"needs {missing}"


def main() -> int:
    args = parser(__doc__).parse_args()
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.models.generate import SamplingParams, generate
    from megatron_ext.models.gpt import build_gpt_chunks, model_vocab_size
    from parallel import topology

    why = skipped(args.dry_run)
    compat.setup()
    dtype = "fp32" if why else "bf16"
    cfg = compose_config(["model=tiny", f"model.dtype={dtype}", "logging=none"])
    topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = model_vocab_size(cfg, tokenizer)
    chunks = build_gpt_chunks(cfg, topo, vocab)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
    table = Table(f"Generation engines, greedy, same weights (tiny, {dtype}, world 1)",
                  ["engine", "rows", "tokens", "tokens equal to ours", "max abs logprob diff",
                   "result"])
    run = dict(vocab_size=vocab, generator=None)
    ours = generate(chunks, prompts, tokenizer, params, engine="ours", **run)
    table.add("ours", len(prompts), int(ours.response_lens.sum()), "-", "-", "ok")
    if why is not None:
        table.add("megatron (DynamicInferenceEngine)", len(prompts), "-", "-", "-",
                  f"skipped: {why}")
        return table.finish(args.out)
    try:
        theirs = generate(chunks, prompts, tokenizer, params, engine="megatron", **run)
    except Exception as err:  # the row says what broke; the other stages still run
        table.add("megatron (DynamicInferenceEngine)", len(prompts), "-", "-", "-",
                  f"FAIL ({type(err).__name__}: {str(err)[:160]})".replace("|", "/"))
        return table.finish(args.out)
    equal, diff = compare(ours, theirs)
    verdict = "ok" if equal and diff <= LOGPROB_TOL else (
        f"FAIL (tokens equal: {equal}, logprob diff {diff:.2e} vs tol {LOGPROB_TOL:g})")
    table.add("megatron (DynamicInferenceEngine)", len(prompts),
              int(theirs.response_lens.sum()), "yes" if equal else "no", f"{diff:.2e}", verdict)
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
