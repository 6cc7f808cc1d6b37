"""Experience for one RL step: draw prompts, sample a group of responses per prompt, score them,
and keep the groups whose pass rate lies in the difficulty band (refilling the batch).

Every rank of a pipeline (its TP and PP ranks) runs this with the same seeds and gets the same
groups, because `generate` hands every rank the same tokens; DP ranks draw different prompts."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from megatron_ext.rl.filtering import FillResult, PassRateHistory, fill_batch
from megatron_ext.rl.rewards import CombinedReward, is_correct
from megatron_ext.models.generate import SamplingParams, generate


@dataclasses.dataclass
class Group:
    """`group_size` responses to one prompt; `[G, L]` tensors as `Rollout` gives them."""

    prompt_index: int  # index into the prompt pool
    tokens: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    rewards: torch.Tensor  # [G] fp32: the configured (weighted) reward
    correct: torch.Tensor  # [G] fp32: the verifier (rewards.is_correct); the pass rate's source
    response_lens: torch.Tensor  # [G]
    truncated: int  # responses cut at max_new_tokens


class PromptPool:
    """The task's training problems as token ids, drawn without replacement within a step with
    PassRateHistory's weights (prompts outside the band come back rarely)."""

    def __init__(self, problems: Sequence, tokenizer):
        self.problems = list(problems)
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.prompts = [bos + tokenizer.encode(p.prompt) for p in self.problems]

    def __len__(self) -> int:
        return len(self.problems)

    def draw(self, n: int, history: PassRateHistory, generator: torch.Generator) -> List[int]:
        weights = history.sampling_weights(range(len(self)))
        return torch.multinomial(weights, min(n, len(self)), replacement=False,
                                 generator=generator).tolist()


def sample_groups(model, pool: PromptPool, indices: Sequence[int], *, group_size: int,
                  params: SamplingParams, reward: CombinedReward, tokenizer, vocab_size: int,
                  generator: torch.Generator, tp_group, pp_group, num_slots: int,
                  engine: str = "ours", cuda_graphs: str = "auto") -> List[Tuple[Group, float]]:
    """One rollout batch: `group_size` samples for each prompt index, with its pass rate (the
    share of samples the verifier accepts); at most `num_slots` sequences generate at once."""
    prompts = [pool.prompts[i] for i in indices for _ in range(group_size)]
    problems = [pool.problems[i] for i in indices for _ in range(group_size)]
    out = generate(model, prompts, tokenizer, params, vocab_size=vocab_size,
                   generator=generator, tp_group=tp_group, pp_group=pp_group,
                   num_slots=num_slots, engine=engine, cuda_graphs=cuda_graphs)
    total, parts = reward.score(out.texts, problems)
    correct = verdicts(parts, out.texts, problems)
    groups = []
    for g, index in enumerate(indices):
        rows = slice(g * group_size, (g + 1) * group_size)
        group = Group(index, out.tokens[rows], out.response_mask[rows], out.logprobs[rows],
                      total[rows], correct[rows], out.response_lens[rows],
                      sum(r == "length" for r in out.finish_reasons[rows]))
        groups.append((group, float(group.correct.mean())))
    return groups


def verdicts(parts: Dict[str, torch.Tensor], texts: Sequence[str], problems: Sequence
             ) -> torch.Tensor:
    """The verifier's verdicts (rewards.is_correct) `[n]` fp32: the reward's own term when it
    is the verifier (task_correct on task problems, math on JSONL records: math-verify is slow
    enough not to run twice), else judged here."""
    kinds = {isinstance(p, Mapping) for p in problems}
    name = "math" if kinds == {True} else "task_correct" if kinds == {False} else None
    if name in parts:
        return parts[name]
    return torch.tensor([is_correct(t, p) for t, p in zip(texts, problems)],
                        dtype=torch.float32)


def collect(model, pool: PromptPool, history: PassRateHistory, *, rl, params: SamplingParams,
            reward: CombinedReward, tokenizer, vocab_size: int, seed: int, device: torch.device,
            tp_group, pp_group) -> Tuple[FillResult, List[Group]]:
    """Fill one step's batch: `rl.prompts_per_step` groups in [rl.band_low, rl.band_high], in
    at most `rl.max_refill_rounds` rollout rounds. Returns fill_batch's result (kept groups and
    counters) and every sampled group (for the reward and length statistics).

    Prompts are drawn on the host; the sampler's seed comes from a generator on the model's
    `device` (the engine hashes its noise on the device from it), both seeded from `seed`,
    which differs per step and DP rank, so rollouts are reproducible."""
    candidates = pool.draw(rl.prompts_per_step * rl.max_refill_rounds, history,
                           torch.Generator().manual_seed(seed))
    generator = torch.Generator(device=device).manual_seed(seed)
    sampled: List[Group] = []

    def sample(indices: List[int]):
        groups = sample_groups(model, pool, indices, group_size=rl.group_size, params=params,
                               reward=reward, tokenizer=tokenizer, vocab_size=vocab_size,
                               generator=generator, tp_group=tp_group, pp_group=pp_group,
                               num_slots=rl.rollout_batch, engine=rl.engine,
                               cuda_graphs=rl.cuda_graphs)
        sampled.extend(g for g, _ in groups)
        return groups

    result = fill_batch(sample, candidates, rl.prompts_per_step, (rl.band_low, rl.band_high),
                        rl.max_refill_rounds)
    return result, sampled


def rollout_stats(result: FillResult, sampled: List[Group]) -> Dict[str, float]:
    """Sums and counts (to be added over DP ranks) describing what was sampled and kept."""
    rewards = torch.cat([g.rewards for g in sampled])
    lens = torch.cat([g.response_lens for g in sampled]).float()
    return {"groups_sampled": float(len(sampled)), "groups_kept": float(result.kept),
            "dropped_too_easy": float(result.dropped_too_easy),
            "dropped_too_hard": float(result.dropped_too_hard),
            "refill_rounds": float(result.rounds), "samples": float(rewards.numel()),
            "reward_sum": float(rewards.sum()), "reward_sq_sum": float((rewards ** 2).sum()),
            "correct_sum": float(torch.cat([g.correct for g in sampled]).sum()),
            "zero_adv_sampled": float(sum(bool(g.rewards.max() == g.rewards.min())
                                          for g in sampled)),
            "response_len_sum": float(lens.sum()),
            "truncated": float(sum(g.truncated for g in sampled))}
