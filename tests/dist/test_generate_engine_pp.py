"""The generation engine's pipelined schedule with G slot groups in flight through the
S = pp * vpp stages, G from 1 (one stage at a time) to S (every stage every tick), in one
2-process gloo launch: at PP=2 and PP=2 x VPP=2, from the PP=1 weights, every G gives PP=1's
greedy tokens and seed-determined samples (all slots, and 3 slots refilled); stage s runs only
on the ticks t with (t - s) mod S < G; at the default G = pp every rank runs exactly one pass
on every tick but the pipeline's fill and drain."""

import torch
import torch.distributed as dist

from ._spawn import run_distributed

TOL = 1e-5
LAYOUTS = [(1, None), (2, None), (2, 2)]  # (pp, vpp); PP=1 first: the reference


def _run(chunks, topo, tok, prompts, params, groups, seed, num_slots):
    """(results, [(chunk, tick) of each decoder call], the engine's G)."""
    from megatron_ext.models.generate import Engine

    engine = Engine(chunks, tok, params, vocab_size=tok.vocab_size, num_slots=num_slots,
                    max_len=max(map(len, prompts)) + params.max_new_tokens, seed=seed,
                    pp_group=topo.pp_group, groups=groups)
    busy, decoder = [], engine.decoder

    def counting(v, *args):
        busy.append((v, engine.tick))
        return decoder(v, *args)
    engine.decoder = counting
    for p in prompts:
        engine.add_request(p)
    results = engine.drain()
    engine.release()
    return results, busy, engine.groups


def _layout_checks(chunks, topo, tok, prompts, reference):
    from megatron_ext.models.generate import SamplingParams

    runs = [(SamplingParams(max_new_tokens=10, temperature=0), 0, len(prompts)),
            (SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95), 100, len(prompts)),
            (SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.95), 100, 3)]
    stages = topo.dims.pp * len(chunks)
    got = {}
    for groups in [None] + list(range(1, stages + 1)):
        where = f"pp {topo.dims.pp} vpp {len(chunks)} G={groups} rank {topo.rank}"
        for i, (params, seed, slots) in enumerate(runs):
            results, busy, used = _run(chunks, topo, tok, prompts, params, groups, seed, slots)
            got[i] = results
            # the decode and prefill rows of a pass are two calls of one chunk on one tick
            calls = sorted(set(busy))
            for v, tick in calls:  # chunk v of this rank is stage v * pp + rank
                stage = v * topo.dims.pp + topo.pp_rank
                assert (tick - stage) % stages < used, (where, v, tick)
            if groups is None:  # pp: this rank runs one pass on every tick but fill/drain
                assert used == topo.dims.pp, where
                ticks = [t for _, t in calls]
                assert len(ticks) == len(set(ticks)), (where, "two passes on one tick")
                if slots == len(prompts):  # (3 slots for 8 leave a group empty at times)
                    assert len(ticks) >= max(ticks) + 1 - 2 * stages, (where, len(ticks))
            if reference is not None:
                for r, want in zip(results, reference[i]):
                    assert r.tokens == want.tokens, (where, i, r.request)
                    diff = max((abs(a - b) for a, b in zip(r.logprobs, want.logprobs)),
                               default=0.0)
                    assert diff <= TOL, (where, i, r.request, diff)
    assert any(r.finish_reason == "length" for r in got[0]), "no row ran to the limit"
    return got


def _checks(rank, world_size):
    from megatron_ext import compat

    compat.setup()
    from megatron.core import parallel_state as ps

    from megatron_ext.config.schema import Config
    from megatron_ext.data.task import ArithmeticTask
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.models.gpt import build_gpt_chunks
    from megatron_ext.models.reshard import gather_full_state, load_full_state
    from parallel import topology

    tok = ByteTokenizer()
    problems = ArithmeticTask(seed=1, min_ops=1, max_ops=3).take(4)
    prompts = [[tok.bos_id] + tok.encode(p.prompt) for p in problems for _ in range(2)]
    weights, reference = None, None
    for pp, vpp in LAYOUTS:
        cfg = Config()
        cfg.model.num_layers = 4
        cfg.model.init_method_std = 0.2  # peaked logits: no near-ties for greedy to flip on
        cfg.parallel.pp, cfg.parallel.vpp = pp, vpp
        topo = topology.initialize(topology.ParallelDims(world_size, pp=pp, vpp=vpp), seed=5)
        chunks = build_gpt_chunks(cfg, topo, 512)
        if weights is None:
            box = [gather_full_state(chunks, topo)]
            dist.broadcast_object_list(box, src=0)
            weights = box[0]
        else:
            load_full_state(chunks, weights, topo)
        for c in chunks:
            c.eval()
        with torch.no_grad():
            result = _layout_checks(chunks, topo, tok, prompts, reference)
        reference = reference or result
        ps.destroy_model_parallel()


def test_every_group_count_gives_pp1_tokens():
    run_distributed(_checks, 2)
