"""Generation alone: our engine (models/generate.py, through a megatron GPTModel) against
transformers' `generate` on the same weights, and our pipelined decode at PP=2 against PP=1.

    python -m benchmarks.generation [--batches 1 16 128] [--lengths 32 256] [--threads 1 2] \
        [--repeats 2] [--pp-batches 16 128] [--pp-length 128] [--pp-groups 2 1] [--pp-vpp 1]

The model: a random `LlamaForCausalLM` of the `tiny` preset's shape (4 layers, hidden 64, 4
heads / 2 KV groups, SwiGLU 128, vocab 384; rl_throughput.py's), saved with save_pretrained and
imported into our GPTModel by `model=hf` (convert/hf_load.py), so both sides hold the very same
weights. Prompts: random byte ids, 16 tokens each (one length: transformers then needs no
padding). Both sides sample at temperature 1 over the whole vocab (no top-k, no top-p) and run
every response to exactly the length limit (EOS ignored: our tokenizer stand-in has no EOS id,
transformers gets min_new_tokens = max_new_tokens), so the work is the same; tokens/s counts
generated tokens over the wall time of the whole call (prefill, decode, our detokenisation).

Our engine gets `num_slots=batch` when its `generate` takes it (the continuous-batching engine),
so every prompt has a slot. Each (batch, length, threads) point runs `--repeats` times per side,
alternating sides, after one warm-up call each; the best time counts (on a shared machine the
slowest runs are other jobs' doing). The load average before and after is printed.

PP: the same batch and length through our engine at PP=2 (two gloo processes, one thread each,
each holding half of the layers) against PP=1 (one process, one thread): the ratio of
tokens/s (issue goal >= 0.9: the pipeline hides its bubbles), at each `--pp-groups` G (slot
groups in flight: 2 keeps both stages busy on half the batch each, 1 alternates them on the
whole batch), the variants alternating within one launch. This part drives the Engine directly
(generate() minus its seed broadcast and Rollout tensors), so that G can be set."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LEN = 16


class NoEosTokenizer:
    """What generate() needs of a tokenizer, with an EOS id no token has (lengths stay equal)."""

    eos_id, bos_id = -1, None

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    @staticmethod
    def decode(ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def make_hf_folder(path: str, seed: int = 0):
    """The tiny-shaped random Llama, saved; returned in eval mode."""
    from transformers import LlamaForCausalLM

    from benchmarks.rl_throughput import llama_config, tiny_shape
    from megatron_ext.convert.byte_tokenizer import save_byte_tokenizer
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tiny_shape())).float().eval()
    model.save_pretrained(path)
    save_byte_tokenizer(path)
    return model


def build_ours(hf_dir: str, world: int, pp: int, vpp: int = 1):
    """(chunks, topo, vocab size) of our GPTModel with the HF folder's weights."""
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.convert.hf_load import load_hf_weights
    from megatron_ext.models.gpt import build_gpt_chunks
    from parallel import topology
    compat.setup()
    cfg = compose_config(["model=hf", f"model.hf_path={hf_dir}", "logging=none",
                          f"parallel.pp={pp}"] + ([f"parallel.vpp={vpp}"] if vpp > 1 else []))
    topo = topology.initialize(validate(cfg, world), seed=cfg.seed)
    vocab = cfg.model.vocab_size
    chunks = build_gpt_chunks(cfg, topo, vocab)
    load_hf_weights(chunks, hf_dir, topo, vocab)
    return chunks, topo, vocab


def prompts_for(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, PROMPT_LEN), generator=g)


def run_ours(chunks, prompts: torch.Tensor, length: int, vocab: int) -> float:
    """Seconds for one generate() call; asserts that every row ran to `length`."""
    from megatron_ext.models.generate import SamplingParams, generate
    from benchmarks.rl_throughput import PAD
    params = SamplingParams(max_new_tokens=length, temperature=1.0)
    generator = torch.Generator(device=prompts.device).manual_seed(1)
    start = time.perf_counter()
    out = generate(chunks, prompts.tolist(), NoEosTokenizer(PAD), params, vocab_size=vocab,
                   generator=generator, num_slots=prompts.size(0))
    took = time.perf_counter() - start
    assert bool((out.response_lens == length).all()), out.response_lens
    return took


def run_hf(model, prompts: torch.Tensor, length: int) -> float:
    from benchmarks.rl_throughput import PAD
    torch.manual_seed(1)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                             min_new_tokens=length, pad_token_id=PAD)
    took = time.perf_counter() - start
    assert out.shape == (prompts.size(0), PROMPT_LEN + length), out.shape
    return took


def engine_vs_hf(args, hf_dir: str):
    print("our engine vs transformers generate (same weights):", flush=True)
    hf = make_hf_folder(hf_dir)
    chunks, topo, vocab = build_ours(hf_dir, 1, 1)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            prompts = prompts_for(batch)
            for length in args.lengths:
                run_ours(chunks, prompts, 4, vocab)  # warm-up
                run_hf(hf, prompts, 4)
                ours, theirs = [], []
                for r in range(args.repeats):  # alternating, so both meet the same load
                    order = [("ours", ours), ("hf", theirs)]
                    for side, times in (order if r % 2 == 0 else order[::-1]):
                        times.append(run_ours(chunks, prompts, length, vocab) if side == "ours"
                                     else run_hf(hf, prompts, length))
                tokens = batch * length
                row = (threads, batch, length, tokens / min(ours), tokens / min(theirs))
                rows.append(row)
                print(f"  threads {threads} batch {batch:>3} length {length:>3}: ours "
                      f"{row[3]:>9,.0f} tok/s, transformers {row[4]:>9,.0f} tok/s, ratio "
                      f"{row[3] / row[4]:.2f}x", flush=True)
    return rows


def run_engine(chunks, prompts: torch.Tensor, length: int, vocab: int, pp_group,
               groups) -> float:
    """Seconds for one Engine drain with `groups` slot groups in flight (None: its default), the
    sampler seeded as generate() would at seed 1; asserts that every row ran to `length`."""
    from megatron_ext.models.generate import Engine, SamplingParams
    from benchmarks.rl_throughput import PAD
    params = SamplingParams(max_new_tokens=length, temperature=1.0)
    start = time.perf_counter()
    engine = Engine(chunks, NoEosTokenizer(PAD), params, vocab_size=vocab,
                    num_slots=prompts.size(0), max_len=PROMPT_LEN + length, seed=1,
                    pp_group=pp_group, groups=groups)
    for p in prompts.tolist():
        engine.add_request(p)
    results = engine.drain()
    engine.release()
    took = time.perf_counter() - start
    assert all(len(r.tokens) == length for r in results)
    return took


def _pp_worker(rank, world, hf_dir, batches, length, repeats, variants, vpp, out_path):
    torch.set_num_threads(1)
    chunks, topo, vocab = build_ours(hf_dir, world, world, vpp if world > 1 else 1)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    group = topo.pp_group if world > 1 else None
    variants = [None] if world == 1 else variants
    results = {}
    for batch in batches:
        prompts = prompts_for(batch)
        for groups in variants:
            run_engine(chunks, prompts, 4, vocab, group, groups)  # warm-up
        times = {groups: [] for groups in variants}
        for r in range(repeats):  # the variants alternate, so they meet the same load
            for groups in (variants if r % 2 == 0 else variants[::-1]):
                dist.barrier()
                times[groups].append(run_engine(chunks, prompts, length, vocab, group, groups))
        for groups in variants:
            results[batch, groups] = batch * length / min(times[groups])
    if rank == 0:
        torch.save(results, out_path)
    ps.destroy_model_parallel()


def pp_vs_pp1(args, hf_dir: str):
    """[(batch, PP=1 tok/s, {groups: PP=2 tok/s})]; PP=2 (x VPP=args.pp_vpp) at each of
    args.pp_groups (default: every G from S = 2 * vpp down to 1)."""
    from tests.dist._spawn import run_distributed
    variants = args.pp_groups or list(range(2 * args.pp_vpp, 0, -1))
    got = {}
    for world in (1, 2):
        path = os.path.join(os.path.dirname(hf_dir), f"pp{world}.pt")
        run_distributed(_pp_worker, world, hf_dir, args.pp_batches, args.pp_length,
                        args.repeats, variants, args.pp_vpp, path, timeout_s=1200)
        got[world] = torch.load(path)
        print(f"  PP={world}: " + ", ".join(
            f"batch {b} {f'G={g} ' if world > 1 else ''}{v:,.0f} tok/s"
            for (b, g), v in got[world].items()), flush=True)
    return [(b, got[1][b, None], {g: got[2][b, g] for g in variants}) for b in args.pp_batches]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--lengths", type=int, nargs="+", default=[32, 256])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--pp-batches", type=int, nargs="+", default=[16, 128])
    p.add_argument("--pp-length", type=int, default=128)
    p.add_argument("--pp-groups", type=int, nargs="+",
                   help="slot groups in flight to compare (default: S = 2 * vpp, the engine's "
                        "default, down to 1)")
    p.add_argument("--pp-vpp", type=int, default=1, help="virtual stages per rank at PP=2")
    p.add_argument("--only", choices=("hf", "pp"), help="one comparison only")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        hf_dir = os.path.join(tmp, "hf")
        rows = engine_vs_hf(args, hf_dir) if args.only != "pp" else []
        if args.only == "pp":
            make_hf_folder(hf_dir)
        pp_rows = pp_vs_pp1(args, hf_dir) if args.only != "hf" else []
    import transformers
    print(f"\nGeneration tokens/s (generated tokens / wall time of the call), prompts of "
          f"{PROMPT_LEN} tokens, temperature 1, EOS ignored; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          f"{time.perf_counter() - started:.0f} s\n")
    if rows:
        print("| threads | batch | new tokens | ours tok/s | transformers tok/s | ours / transformers |")
        print("|---|---|---|---|---|---|")
    for threads, batch, length, ours, theirs in rows:
        print(f"| {threads} | {batch} | {length} | {ours:,.0f} | {theirs:,.0f} | "
              f"{ours / theirs:.2f}x |")
    if pp_rows:
        names = [f"G={g}" for g in pp_rows[0][2]]
        vpp = f" x VPP={args.pp_vpp}" if args.pp_vpp > 1 else ""
        print(f"\nPP=2{vpp} (2 processes x 1 thread) vs PP=1 (1 process x 1 thread), "
              f"{args.pp_length} new tokens; G: slot groups in flight (G >= 2 keeps every "
              f"rank busy, G=2 the engine's default; G=1 runs one rank at a time on the whole "
              f"batch)\n")
        print("| batch | PP=1 tok/s | " + " | ".join(f"PP=2 {n} tok/s" for n in names) + " | "
              + " | ".join(f"{n} / PP1" for n in names) + " |")
        print("|---" * (2 + 2 * len(names)) + "|")
        for batch, one, two in pp_rows:
            print(f"| {batch} | {one:,.0f} | " + " | ".join(f"{v:,.0f}" for v in two.values())
                  + " | " + " | ".join(f"{v / one:.2f}x" for v in two.values()) + " |")


if __name__ == "__main__":
    main()
