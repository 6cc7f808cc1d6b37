"""generate's DP shares (megatron_ext/generate.py dp_share): contiguous runs of whole batches
that cover every prompt exactly once, in order, balanced to within one batch."""
import pytest

from megatron_ext.generate import dp_share


@pytest.mark.parametrize("count, batch, dp", [(8, 2, 2), (5, 2, 2), (7, 3, 4), (1, 4, 3),
                                              (0, 2, 2), (100, 8, 3)])
def test_shares_are_contiguous_whole_batches_covering_every_prompt_once(count, batch, dp):
    shares = [dp_share(count, batch, dp, r) for r in range(dp)]
    assert [i for s in shares for i in s] == list(range(count))
    for s in filter(None, shares):
        assert s.start % batch == 0  # every batch is one a single process runs
    batches = [-(-len(s) // batch) for s in shares]
    assert max(batches) - min(batches) <= 1
    assert batches == sorted(batches, reverse=True)


def test_two_replicas_each_take_half_of_eight_prompts():
    assert [dp_share(8, 2, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
