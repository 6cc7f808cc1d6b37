"""Held-out answer accuracy by generation: rollouts on held-out prompts, judged by the verifier
(rewards.is_correct: the task's, or math-verify for JSONL problems). Unlike teacher-forced exact
match it accepts any solution whose final answer is right, which is what RL optimises.

Greedy decoding gives `accuracy` (the regression guard's number). With `rl.eval_k > 1` (or
`rl.eval_samples > 1`) every problem also gets n samples at the rollout temperature, scored
by the unbiased pass@k estimator of Chen et al. (2021, the Codex paper)."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from megatron_ext.models.generate import SamplingParams, generate
from megatron_ext.rl.experience import PromptPool
from megatron_ext.rl.rewards import is_correct
from megatron_ext.training import collectives


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of the n samples, drawn without replacement, hold one of the c correct
    ones: 1 - C(n-c, k) / C(n, k), as the product of (1 - k/i) over i = n-c+1..n, which never
    forms the binomials (they overflow a float for n in the hundreds)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def eval_samples(rl) -> int:
    """Samples per held-out problem: rl.eval_samples, else rl.eval_k (1: greedy only)."""
    return rl.eval_samples if rl.eval_samples is not None else rl.eval_k


def _pass_sums(model, pool: PromptPool, mine: Sequence[int], params: SamplingParams, n: int,
               ks: Sequence[int], generator, tokenizer, **gen) -> list:
    """Sum over the problems `mine` of pass@k for each k, from n responses to each."""
    out = generate(model, [pool.prompts[i] for i in mine for _ in range(n)], tokenizer, params,
                   generator=generator, **gen)
    problems = [pool.problems[i] for i in mine for _ in range(n)]
    correct = [is_correct(t, p) > 0 for t, p in zip(out.texts, problems)]
    counts = [sum(correct[j * n:(j + 1) * n]) for j in range(len(mine))]
    return [sum(pass_at_k(n, c, k) for c in counts) for k in ks]


def heldout_eval(model, pool: PromptPool, rl, *, tokenizer, vocab_size: int, topo, seed: int,
                 device: torch.device, contribute: bool) -> Dict[str, float]:
    """The eval record's generation numbers, reduced over the DP ranks (each scores problems
    dp_rank, dp_rank + dp, ...): `accuracy` (greedy), `pass@1` (greedy when one sample per
    problem is asked, else the estimate from the samples, like `pass@k`), `pass@{rl.eval_k}`
    and `samples` (problems). Sampling uses a generator on the model's device seeded by `seed`
    (the same on a pipeline's TP and PP ranks, so they all draw the same tokens)."""
    n, k = eval_samples(rl), rl.eval_k
    mine = list(range(topo.dp_rank, len(pool), topo.dims.dp))
    sums = [float(len(mine)), 0.0, 0.0, 0.0]  # problems, greedy solved, sampled pass@1, pass@k
    if mine:
        gen = dict(tokenizer=tokenizer, vocab_size=vocab_size, tp_group=topo.tp_group,
                   pp_group=topo.pp_group, num_slots=rl.rollout_batch, engine=rl.engine,
                   cuda_graphs=rl.cuda_graphs)
        greedy = SamplingParams(rl.max_new_tokens, 0.0, stop=tuple(rl.stop))
        sums[1] = _pass_sums(model, pool, mine, greedy, 1, (1,), None, **gen)[0]
        if n > 1:
            params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, tuple(rl.stop))
            sums[2:] = _pass_sums(model, pool, mine, params, n, (1, k),
                                  torch.Generator(device=device).manual_seed(seed), **gen)
    count, solved, pass1, passk = collectives.reduce_floats(sums, contribute=contribute)
    count_or_1 = max(count, 1.0)
    rec = {"accuracy": solved / count_or_1, "samples": int(count)}
    if n == 1:
        return rec | {"pass@1": rec["accuracy"]}
    return rec | {"pass@1": pass1 / count_or_1, f"pass@{k}": passk / count_or_1}


def describe(rec: Dict, rl) -> Optional[str]:
    """The eval line's words for the sampled pass@k (None when only greedy ran)."""
    n, k = eval_samples(rl), rl.eval_k
    if n == 1:
        return None
    at_k = f" | pass@{k} {rec[f'pass@{k}']:.1%}" if k > 1 else ""
    return (f"pass@1 {rec['pass@1']:.1%}{at_k} ({n} samples per problem at temperature "
            f"{rl.temperature:g})")
