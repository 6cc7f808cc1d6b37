"""Held-out answer accuracy by generation: greedy rollouts on held-out prompts, judged by the
verifier (rewards.is_correct: the task's, or math-verify for JSONL problems). Unlike teacher-forced exact match it accepts any solution whose
final answer is right, which is what RL optimises."""
from __future__ import annotations

from typing import Sequence, Tuple

from megatron_ext.rl.experience import PromptPool
from megatron_ext.rl.rewards import is_correct
from megatron_ext.models.generate import SamplingParams
from megatron_ext.models.slots import generate_in_slots


def heldout_accuracy(model, pool: PromptPool, *, max_new_tokens: int, stop: Sequence[str],
                     tokenizer, vocab_size: int, dp_rank: int, dp_size: int, tp_group,
                     pp_group, num_slots: int) -> Tuple[float, float]:
    """(solved, attempted) on this DP rank's share of the pool (prompts dp_rank, dp_rank +
    dp_size, ...), generated `num_slots` sequences at a time; sum both over the DP ranks for
    the accuracy."""
    mine = list(range(dp_rank, len(pool), dp_size))
    if not mine:
        return 0.0, 0.0
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(stop))
    out = generate_in_slots(model, [pool.prompts[i] for i in mine], tokenizer, params,
                            num_slots=num_slots, vocab_size=vocab_size, generator=None,
                            tp_group=tp_group, pp_group=pp_group)
    solved = sum(is_correct(text, pool.problems[i]) for text, i in zip(out.texts, mine))
    return float(solved), float(len(mine))
