"""models/decode.py across ranks, in one 2-process gloo launch: the scenario of
tests/unit/test_decode.py (prefill into scattered slots, decode on changing slot sets, a slot
reused, mixed prefill and decode rows) at TP=2 (against that layout's training forward), and
at PP=2 and PP=2 x VPP=2 with the chunks chained by send/recv in megatron's interleaved order
(against the training forward of the same weights at TP=1), for our preset and HF models."""

import torch
import torch.distributed as dist

from ._spawn import run_distributed

LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
           "pp2vpp2": ["parallel.pp=2", "parallel.vpp=2"]}
PRESET = ["model.fused_swiglu=true", "model.init_method_std=0.2"]
SAME_PADDING = ["model.make_vocab_size_divisible_by=256"]  # 512 rows at TP 1 and 2


def _pipeline(decoder, chunks, topo):
    """A step through every stage of the pipeline: chunk v of rank r takes rank r-1's output
    (rank pp-1's chunk v-1 for r = 0); logits on the last stage, None elsewhere."""
    models = decoder.models
    pp = topo.dims.pp
    rank = dist.get_rank(topo.pp_group)
    prev = dist.get_global_rank(topo.pp_group, (rank - 1) % pp)
    nxt = dist.get_global_rank(topo.pp_group, (rank + 1) % pp)
    hidden_size = models[0].config.hidden_size

    def step(tokens, slots, positions, lengths):
        n, t = tokens.shape
        for v, model in enumerate(models):
            inputs = tokens
            if not model.pre_process:
                inputs = torch.empty(t, n, hidden_size)
                dist.recv(inputs, src=prev, group=topo.pp_group)
            out = decoder.forward(v, inputs, slots, positions, lengths)
            if model.post_process:
                return out
            dist.send(out.contiguous(), dst=nxt, group=topo.pp_group)
        return None
    return step


def _checks(rank, world_size, models):
    from megatron_ext import compat

    compat.setup()
    from megatron_ext.models.decode import ChunkDecoder, SlotCache
    from megatron_ext.models.reshard import gather_full_state, load_full_state
    from parallel import topology
    from tests.unit.test_decode import (MAX_LEN, NUM_SLOTS, build, check_scenario,
                                        full_logits, scenario)

    for name, (overrides, vocab, hf_dir) in models.items():
        overrides = overrides + SAME_PADDING
        chunks, topo = build(topology, overrides, vocab, hf_dir, world_size)  # TP=1, DP=2
        box = [gather_full_state(chunks, topo)]
        dist.broadcast_object_list(box, src=0)
        full = full_logits(chunks[0])
        logits = {tuple(ids): full(ids) for ids in scenario(vocab)[0].values()}
        reference = lambda ids: logits[tuple(ids)]  # noqa: E731
        for layout, parallel in LAYOUTS.items():
            where = f"{name} {layout} rank {rank}"
            chunks, topo = build(topology, overrides + parallel, vocab, None, world_size)
            load_full_state(chunks, box[0], topo)
            decoder = ChunkDecoder(chunks, SlotCache(chunks, NUM_SLOTS, MAX_LEN))
            if topo.dims.pp == 1:
                step = lambda *args: decoder.forward(0, *args)  # noqa: E731
                check_scenario(step, full_logits(chunks[0]), vocab, torch.device("cpu"), where)
            else:
                check_scenario(_pipeline(decoder, chunks, topo), reference, vocab,
                               torch.device("cpu"), where)


def test_decode_tp2_pp2_vpp2_match_training_forward(tmp_path):
    from tests.hf_tiny import VOCAB, make_hf_model

    models = {"preset": (PRESET, 259, None)}
    for kind in ("qwen3", "llama_tied"):
        make_hf_model(kind, str(tmp_path / kind))
        models[kind] = (["model=hf", f"model.hf_path={tmp_path / kind}"], VOCAB,
                        str(tmp_path / kind))
    run_distributed(_checks, 2, models)
