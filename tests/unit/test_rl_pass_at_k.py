"""pass@k: the unbiased estimator against its definition (the share of k-subsets of the n
samples holding a correct one, enumerated), stable where the binomials overflow a float, and
the rl.eval_k / rl.eval_samples rules."""
import dataclasses
import itertools
import math
from fractions import Fraction

import pytest

from megatron_ext.config.fields import ConfigError, check_fields
from megatron_ext.config.rl import RLConfig, check_rl
from megatron_ext.rl.evaluation import pass_at_k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 0, 2), (4, 1, 1), (4, 1, 4),
                                   (5, 2, 2), (6, 3, 4), (7, 1, 3), (8, 5, 3), (8, 0, 8),
                                   (9, 4, 1), (10, 3, 5), (10, 9, 2), (12, 2, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_the_binomials_overflow_a_float():
    n, c, k = 2000, 7, 300  # C(2000, 300) ~ 1e365: beyond a float
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    # pass@1 is the plain fraction correct, and pass@k grows with k
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12)
    assert [pass_at_k(10, 3, k) for k in range(1, 11)] == sorted(
        pass_at_k(10, 3, k) for k in range(1, 11))


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 5), (4, 1, 0)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
        pass_at_k(n, c, k)


def _check(rl):
    check_fields(rl, "rl.")
    check_rl(rl)


def test_eval_k_rules_name_the_field_and_the_fix():
    _check(RLConfig())  # eval_k=1: greedy pass@1 only
    _check(RLConfig(eval_k=4))
    _check(RLConfig(eval_k=4, eval_samples=16))
    _check(RLConfig(eval_samples=8))  # sampled pass@1 from 8 samples
    _check(RLConfig(algorithm="ppo", group_size=1, temperature=0.0))  # greedy eval needs no T
    for change, match in [
            ({"eval_k": 0}, r"rl.eval_k=0 must be >= 1 \(the k of pass@k\)"),
            ({"eval_samples": 0}, r"rl.eval_samples=0 must be >= 1"),
            ({"eval_k": 4, "eval_samples": 2},
             r"rl.eval_samples=2 is below rl.eval_k=4.*set rl.eval_samples >= rl.eval_k"),
            ({"algorithm": "ppo", "group_size": 1, "temperature": 0.0, "eval_k": 4},
             r"rl.eval_k=4 .*rl.temperature=0.*use rl.temperature > 0 or rl.eval_k=1")]:
        with pytest.raises(ConfigError, match=match):
            _check(dataclasses.replace(RLConfig(), **change))


def test_heldout_eval_scores_this_dp_ranks_problems_from_n_samples_each(monkeypatch):
    """DP rank 1 of 2 scores problems 1, 3, 5: greedy once each (temperature 0, no generator),
    then rl.eval_samples=5 samples each at rl.temperature; pass@k per problem from its own
    samples, averaged over the problems."""
    from types import SimpleNamespace

    import torch

    from megatron_ext.data.problems import ProblemRecord
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.rl import evaluation
    from megatron_ext.rl.experience import PromptPool

    tokenizer = build_tokenizer("byte")
    pool = PromptPool([ProblemRecord({"answer": str(j)}, f"Q{j}\n") for j in range(6)],
                      tokenizer)
    index = {tuple(p): j for j, p in enumerate(pool.prompts)}
    correct_samples = {1: 1, 3: 3, 5: 1}  # c of the 5 samples of each problem are right
    calls = []

    def fake_generate(model, prompts, tok, params, *, generator, vocab_size, tp_group, pp_group,
                      num_slots, engine, cuda_graphs):
        assert num_slots in (7, RLConfig().rollout_batch)  # eval is bounded by rl.rollout_batch
        assert engine == RLConfig().engine  # rl.engine chooses the eval's engine too
        assert cuda_graphs == RLConfig().cuda_graphs  # and rl.cuda_graphs its CUDA graphs
        calls.append(([index[tuple(p)] for p in prompts], params.temperature, generator))
        texts, seen = [], {}
        for p in prompts:
            j = index[tuple(p)]
            if params.temperature == 0:
                right = j % 4 == 1  # greedy solves 1 and 5
            else:
                seen[j] = seen.get(j, 0) + 1
                right = seen[j] <= correct_samples[j]
            texts.append(f"\\boxed{{{j if right else j + 10}}}")
        return SimpleNamespace(texts=texts)

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    topo = SimpleNamespace(dp_rank=1, dims=SimpleNamespace(dp=2), tp_group=None, pp_group=None)
    rl = RLConfig(eval_k=2, eval_samples=5, temperature=0.7, rollout_batch=7)
    rec = evaluation.heldout_eval(None, pool, rl, tokenizer=tokenizer, vocab_size=256, topo=topo,
                                  seed=3, device=torch.device("cpu"), contribute=True)
    assert [c[0] for c in calls] == [[1, 3, 5], [1] * 5 + [3] * 5 + [5] * 5]
    assert [c[1] for c in calls] == [0.0, 0.7] and calls[0][2] is None
    assert isinstance(calls[1][2], torch.Generator)
    assert rec["samples"] == 3 and rec["accuracy"] == pytest.approx(2 / 3)
    assert rec["pass@1"] == pytest.approx(5 / 15)
    assert rec["pass@2"] == pytest.approx(sum(pass_at_k(5, c, 2) for c in (1, 3, 1)) / 3)
    assert evaluation.describe(rec, rl).startswith("pass@1 33.3% | pass@2 ")
    # eval_k=1 (the default): greedy only, pass@1 is the greedy accuracy
    calls.clear()
    rec = evaluation.heldout_eval(None, pool, RLConfig(), tokenizer=tokenizer, vocab_size=256,
                                  topo=topo, seed=3, device=torch.device("cpu"), contribute=True)
    assert len(calls) == 1 and rec == {"accuracy": pytest.approx(2 / 3), "samples": 3,
                                       "pass@1": pytest.approx(2 / 3)}
    assert evaluation.describe(rec, RLConfig()) is None
