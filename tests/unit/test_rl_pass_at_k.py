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
