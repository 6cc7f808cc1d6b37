"""models/decode_graph.py at TP=2, PP=2 and PP=2 x VPP=2 on gloo, in one 2-process launch: the
engine's rollouts (greedy and top-p sampled, with refills) with decode passes at fixed shapes,
eagerly and with graph semantics (tests/cuda_graph_fake.py), equal its dynamic-shape ones:
the same tokens, log-probs to 1e-5, on every rank; the buckets (captures) agree across ranks,
so their collectives pair up as a graph capture needs."""

import torch
import torch.distributed as dist

from tests.dist._spawn import run_distributed

TOL = 1e-5
LAYOUTS = [(2, 1, None), (1, 2, None), (1, 2, 2)]  # (tp, pp, vpp)


def _rollouts(chunks, topo, tok, prompts, params, num_slots=5, **options):
    from megatron_ext.models.generate import Engine

    engine = Engine(chunks, tok, params, vocab_size=tok.vocab_size, num_slots=num_slots,
                    max_len=max(map(len, prompts)) + params.max_new_tokens, seed=3,
                    tp_group=topo.tp_group, pp_group=topo.pp_group, **options)
    for p in prompts:
        engine.add_request(p)
    results = engine.drain()
    captures = None if engine.graphs is None else engine.graphs.captures
    engine.release()
    return results, captures


def _same_on_all(values, group, where):
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, values, group=group)
    assert all(g == values for g in gathered), where


def _checks(rank, world_size):
    from megatron_ext import compat

    compat.setup()
    from megatron.core import parallel_state as ps

    from megatron_ext.config.schema import Config
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.models.generate import SamplingParams
    from megatron_ext.models.gpt import build_gpt_chunks
    from parallel import topology
    from tests import cuda_graph_fake

    graphs = cuda_graph_fake.install(setattr)
    tok = ByteTokenizer()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 30, 9, 2, 12)]
    for tp, pp, vpp in LAYOUTS:
        cfg = Config()
        cfg.model.num_layers = 4
        cfg.model.init_method_std = 0.2
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = tp, pp, vpp
        topo = topology.initialize(topology.ParallelDims(world_size, tp=tp, pp=pp, vpp=vpp),
                                   seed=5)
        chunks = build_gpt_chunks(cfg, topo, 512)
        for c in chunks:
            c.eval()
        for params in (SamplingParams(max_new_tokens=24, temperature=0),
                       SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9)):
            where = f"{topo.dims} rank {rank} temperature {params.temperature}"
            want, _ = _rollouts(chunks, topo, tok, prompts, params)
            graphs.clear()
            for options in (dict(fixed_shape=True), dict(cuda_graphs=True)):
                got, captures = _rollouts(chunks, topo, tok, prompts, params, **options)
                assert [r.tokens for r in got] == [r.tokens for r in want], (where, options)
                diff = max(abs(a - b) for g, w in zip(got, want)
                           for a, b in zip(g.logprobs, w.logprobs))
                assert diff <= TOL, f"{where} {options}: log-probs differ by {diff:.3g}"
                _same_on_all(captures, dist.group.WORLD, where)
            assert len(graphs) == captures and all(g.released for g in graphs), where
            assert sum(g.replays for g in graphs) > 3 * captures, where  # reused, per tick
            # a graph per (chunk, rows, keys): every chunk of this rank has its own
            assert captures >= len(chunks), where
        # fewer slots than groups (S = 4 at PP2 x VPP2): a group without slots never runs
        params = SamplingParams(max_new_tokens=8, temperature=0)
        want, _ = _rollouts(chunks, topo, tok, prompts, params, num_slots=3)
        got, _ = _rollouts(chunks, topo, tok, prompts, params, num_slots=3, cuda_graphs=True)
        assert [r.tokens for r in got] == [r.tokens for r in want], f"{topo.dims} 3 slots"
        ps.destroy_model_parallel()


def test_fixed_shape_decode_tp2_pp2_vpp2():
    run_distributed(_checks, 2)
