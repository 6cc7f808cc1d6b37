"""RL pieces that need process groups, in one 2-process gloo launch (a launch costs seconds):

- vocab-parallel log-probs and entropy (values and gradients) equal the unsharded ones,
  including a padded vocab and a shard that is all padding; whitening over a group;
- KV-cached rollouts of the continuous-batching engine through megatron's GPTModel at TP=1
  (two DP ranks) and TP=2: the recorded log-probs equal a full teacher-forced forward's,
  greedy decoding equals step-by-step greedy decoding with a full recompute (prompts of 2 to 45
  tokens included), TP ranks agree, seeds reproduce whatever the slot count (refills), stop
  strings and EOS truncate; at PP=2 and PP=2 x VPP=2 (pipelined decode), from the same
  weights, the same rollouts as TP=1 (the pipeline's schedule itself, every group count and
  every rank busy on every tick: test_generate_engine_pp.py).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._spawn import run_distributed

TOL = 1e-5
# KV-cached decoding vs one full forward, fp32, init std 0.2: the two sum attention in different
# orders; they differ by 4e-6 to 1.1e-5 over six initialisations, and sampled tokens' log-probs
# reach -100, where one fp32 ulp is 7.6e-6
KV_TOL = 2e-5


def _vocab_parallel_checks(rank, world):
    from megatron_ext.rl.advantages import whiten
    from megatron_ext.rl.losses import entropy_from_logits, logprobs_from_logits

    group = dist.new_group(list(range(world)))
    for v_local, vocab_size in [(13, 2 * 13 - 3), (5, 4)]:  # (5, 4): rank 1 is all padding
        gen = torch.Generator().manual_seed(v_local)
        full = torch.randn(3, 7, v_local * world, generator=gen, dtype=torch.float64) * 4
        targets = torch.randint(0, vocab_size, (3, 7), generator=gen)
        weights = torch.rand(3, 7, generator=gen, dtype=torch.float64)
        ref = full.clone().requires_grad_()
        ref_lp = F.log_softmax(ref[..., :vocab_size] / 1.3, dim=-1)
        want_logp = ref_lp.gather(-1, targets[..., None]).squeeze(-1)
        want_ent = -(ref_lp.exp() * ref_lp).sum(-1)
        ((want_logp - 0.5 * want_ent) * weights).sum().backward()

        shard = full[..., rank * v_local:(rank + 1) * v_local].float().requires_grad_()
        logp = logprobs_from_logits(shard, targets, tp_group=group, vocab_size=vocab_size,
                                    temperature=1.3)
        ent = entropy_from_logits(shard, tp_group=group, vocab_size=vocab_size, temperature=1.3)
        ((logp - 0.5 * ent) * weights.float()).sum().backward()
        where = f"rank {rank} v_local {v_local}"
        assert (logp.double() - want_logp).abs().max() < TOL, where
        assert (ent.double() - want_ent).abs().max() < TOL, where
        want_grad = ref.grad[..., rank * v_local:(rank + 1) * v_local]
        assert (shard.grad.double() - want_grad).abs().max() < TOL, where

    x = torch.arange(8.0).view(2, 4) * (rank + 1)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    everything = torch.cat([torch.arange(8.0).view(2, 4) * (r + 1) for r in range(world)])
    want = whiten(everything, mask.repeat(world, 1))[2 * rank:2 * rank + 2]
    assert torch.allclose(whiten(x, mask, group=group), want, atol=1e-6)


def _full_logprobs(model, tokens, topo, vocab_size, temperature):
    """Teacher-forced log-probs of tokens[:, 1:] from one forward without a cache."""
    from megatron_ext.rl.losses import logprobs_from_logits

    positions = torch.arange(tokens.size(1)).expand(tokens.size(0), -1)
    with torch.no_grad():
        logits = model(tokens, positions, None)  # this rank's vocab shard
    return logprobs_from_logits(logits[:, :-1], tokens[:, 1:], tp_group=topo.tp_group,
                                vocab_size=vocab_size, temperature=temperature)


def _greedy_by_recompute(model, prompt, steps, vocab_size, eos_id):
    seq = list(prompt)
    for _ in range(steps):
        tokens = torch.tensor([seq])
        with torch.no_grad():
            logits = model(tokens, torch.arange(len(seq))[None], None, runtime_gather_output=True)
        seq.append(int(logits[0, -1, :vocab_size].argmax()))
        if seq[-1] == eos_id:
            break
    return seq[len(prompt):]


def _same_on_all(tensor, group, where):
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    assert all(torch.equal(g, tensor) for g in gathered), where


def _rollout_checks(chunks, topo, tok, prompts, reference):
    """Checks of one layout; `reference` holds the TP=1 rollouts once they exist."""
    from megatron_ext.models.generate import SamplingParams, generate

    vocab, where = tok.vocab_size, f"{topo.dims} rank {topo.rank}"
    whole = topo.dims.pp == 1  # one forward gives the logits: compare with a full recompute
    model = chunks if len(chunks) > 1 else chunks[0]
    groups = {"tp_group": topo.tp_group, "pp_group": topo.pp_group}
    for c in chunks:
        c.eval()

    def run(params, seed=None, batch=None, num_slots=None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        batch = batch or (group_prompts if params.temperature else prompts)
        return generate(model, batch, tok, params, vocab_size=vocab, generator=gen,
                        num_slots=num_slots, **groups)

    # sampled: recorded log-probs == a full forward's, reproducible from the seed
    group_prompts = [p for p in prompts for _ in range(2)]
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95)
    out = run(params, seed=100)
    assert not any(c.training for c in chunks)
    assert out.response_mask[:, 1:].sum() == out.response_lens.sum() > 0, where
    if whole:
        ref = _full_logprobs(model, out.tokens, topo, vocab, 0.8)
        mask = out.response_mask[:, 1:] > 0
        diff = (ref - out.logprobs[:, 1:])[mask].abs().max().item()
        assert diff <= KV_TOL, f"{where}: rollout vs teacher-forced log-probs differ by {diff:.3g}"
    again = run(params, seed=100)
    assert torch.equal(again.tokens, out.tokens) and torch.equal(again.logprobs, out.logprobs)
    # 3 slots for 8 prompts: refilled as rows finish, the same seed-determined samples
    refilled = run(params, seed=100, num_slots=3)
    assert torch.equal(refilled.tokens, out.tokens), where
    assert (refilled.logprobs - out.logprobs).abs().max().item() <= TOL, where
    for group in (topo.tp_group, topo.pp_group):  # every rank holds the same rollout
        _same_on_all(out.tokens, group, where)
        _same_on_all(out.logprobs, group, where)

    # greedy: equals decoding with a full recompute per token; log-probs at temperature 1
    greedy = run(SamplingParams(max_new_tokens=10, temperature=0))
    if whole:
        for i, prompt in enumerate(prompts):
            n = int(greedy.response_lens[i])
            got = greedy.tokens[i, len(prompt):len(prompt) + n].tolist()
            assert got == _greedy_by_recompute(model, prompt, 10, vocab, tok.eos_id), (where, i)
        ref = _full_logprobs(model, greedy.tokens, topo, vocab, 1.0)
        mask = greedy.response_mask[:, 1:] > 0
        assert (ref - greedy.logprobs[:, 1:])[mask].abs().max().item() <= KV_TOL, where
    # prompts of very different lengths (2 and 45 tokens) in one batch, 2 slots for 3 prompts
    mixed_prompts = [prompts[0][:2], (prompts[1] * 4)[:45], prompts[2]]
    mixed = run(SamplingParams(max_new_tokens=6, temperature=0), batch=mixed_prompts,
                num_slots=2)
    if whole:
        for i, prompt in enumerate(mixed_prompts):
            n = int(mixed.response_lens[i])
            got = mixed.tokens[i, len(prompt):len(prompt) + n].tolist()
            assert got == _greedy_by_recompute(model, prompt, 6, vocab, tok.eos_id), (where, i)
    if reference:  # the same weights in another layout give the same rollouts
        for got, want in zip((out, greedy, mixed), reference):
            assert torch.equal(got.tokens, want.tokens), where
            assert (got.logprobs - want.logprobs).abs().max().item() <= TOL, where

    # stop string: the first printable ASCII character (after the first) a greedy row produced
    row, at = next((i, j) for i, t in enumerate(greedy.texts) for j in range(1, len(t))
                   if t[j].isascii() and t[j].isprintable())
    text, stop = greedy.texts[row], greedy.texts[row][at]
    cut = run(SamplingParams(max_new_tokens=10, temperature=0, stop=[stop]))
    assert cut.finish_reasons[row] == "stop" and cut.texts[row] == text[:text.find(stop)], where
    start, n = len(prompts[row]), int(cut.response_lens[row])
    assert torch.equal(cut.tokens[row, :start + n], greedy.tokens[row, :start + n])
    assert tok.decode(cut.tokens[row, start:start + n].tolist()).endswith(stop)
    assert stop not in tok.decode(cut.tokens[row, start:start + n - 1].tolist())

    # EOS: push the EOS logit up by 100 in the output layer; every row stops at once
    def boost_eos(module, inputs, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., tok.eos_id] += 100.0
        return logits, bias
    last = chunks[-1].output_layer if topo.is_last_stage else None
    handle = last.register_forward_hook(boost_eos) if last is not None else None
    try:
        ended = run(SamplingParams(max_new_tokens=12, temperature=0))
    finally:
        if handle is not None:
            handle.remove()
    assert ended.finish_reasons == ["eos"] * len(prompts) and ended.texts == [""] * len(prompts)
    assert ended.response_lens.tolist() == [1] * len(prompts)
    assert [row[len(p)] for row, p in zip(ended.tokens.tolist(), prompts)] == [tok.eos_id] * len(
        prompts)
    return out, greedy, mixed


LAYOUTS = [  # (tp, pp, vpp); TP=1 first: it is the reference of the others
    (1, 1, None), (2, 1, None), (1, 2, None), (1, 2, 2)]


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

    _vocab_parallel_checks(rank, world_size)

    tok = ByteTokenizer()
    problems = ArithmeticTask(seed=0, min_ops=1, max_ops=3).take(4)
    prompts = [[tok.bos_id] + tok.encode(p.prompt) for p in problems]
    assert len({len(p) for p in prompts}) > 1  # different prompt lengths
    weights, reference = None, None
    for tp, pp, vpp in LAYOUTS:
        cfg = Config()
        cfg.model.num_layers = 4
        cfg.model.init_method_std = 0.2  # peaked logits: no near-ties for greedy to flip on
        cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp = tp, pp, vpp
        dims = topology.ParallelDims(world_size, tp=tp, pp=pp, vpp=vpp)
        topo = topology.initialize(dims, seed=5)
        chunks = build_gpt_chunks(cfg, topo, 512)  # one padded size for TP 1 and 2; 259 used
        if weights is None:  # the TP=1 weights, then loaded into every other layout
            box = [gather_full_state(chunks, topo)]
            dist.broadcast_object_list(box, src=0)
            weights = box[0]
        else:
            load_full_state(chunks, weights, topo)
        result = _rollout_checks(chunks, topo, tok, prompts, reference)
        reference = reference or result
        ps.destroy_model_parallel()


def test_rollout_and_vocab_parallel_ops_on_gloo():
    run_distributed(_checks, 2)
