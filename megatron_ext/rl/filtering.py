"""Difficulty filtering (dynamic sampling): prompt groups that every sample solves, or none
does, have all-equal rewards and so zero GRPO advantage. They cost a rollout and teach nothing,
so they are dropped, the batch is refilled, and prompts seen outside the band are drawn less.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import (Any, Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence,
                    Tuple)

import torch


def _check_band(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"difficulty band [{low}, {high}] is invalid; need 0 <= low <= high <= 1 "
                         "(rl.band_low, rl.band_high)")


def difficulty_filter(pass_rates, low: float, high: float) -> torch.Tensor:
    """Bool mask, True where `low <= pass_rate <= high` (both edges inclusive)."""
    _check_band(low, high)
    rates = torch.as_tensor(pass_rates, dtype=torch.float64)
    return (rates >= low) & (rates <= high)


class PassRateHistory:
    """Exponential moving average of each prompt's pass rate, keyed by a prompt id.

    `sampling_weights` gives 1 to unseen prompts and prompts whose average lies in the band, and
    `out_of_band_weight` to the others, so a sampler drawing with these weights revisits
    solved or hopeless prompts rarely (not never: the policy changes, and so do pass rates).
    """

    def __init__(self, low: float, high: float, *, alpha: float = 0.5,
                 out_of_band_weight: float = 0.1):
        _check_band(low, high)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha} must be in (0, 1] (1 keeps only the latest rate)")
        if not 0.0 <= out_of_band_weight <= 1.0:
            raise ValueError(f"out_of_band_weight={out_of_band_weight} must be in [0, 1]")
        self.low, self.high, self.alpha = low, high, alpha
        self.out_of_band_weight = out_of_band_weight
        self._rate: Dict[Hashable, float] = {}
        self._seen: Dict[Hashable, int] = {}

    def update(self, prompt_ids: Sequence[Hashable], pass_rates: Sequence[float]) -> None:
        if len(prompt_ids) != len(pass_rates):
            raise ValueError(f"{len(prompt_ids)} prompt ids but {len(pass_rates)} pass rates")
        for pid, rate in zip(prompt_ids, pass_rates):
            rate = float(rate)
            old = self._rate.get(pid)
            self._rate[pid] = rate if old is None else (1 - self.alpha) * old + self.alpha * rate
            self._seen[pid] = self._seen.get(pid, 0) + 1

    def pass_rate(self, prompt_id: Hashable) -> Optional[float]:
        """The averaged pass rate, or None for a prompt never seen."""
        return self._rate.get(prompt_id)

    def sampling_weights(self, prompt_ids: Sequence[Hashable]) -> torch.Tensor:
        """fp64 weights, one per id (unnormalised; torch.multinomial takes them as they are)."""
        weights = [1.0 if (r := self._rate.get(pid)) is None or self.low <= r <= self.high
                   else self.out_of_band_weight for pid in prompt_ids]
        return torch.tensor(weights, dtype=torch.float64)

    def state_dict(self) -> Dict[str, Any]:
        ids = list(self._rate)
        return {"low": self.low, "high": self.high, "alpha": self.alpha,
                "out_of_band_weight": self.out_of_band_weight, "ids": ids,
                "rates": [self._rate[i] for i in ids], "seen": [self._seen[i] for i in ids]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        _check_band(state["low"], state["high"])
        self.low, self.high, self.alpha = state["low"], state["high"], state["alpha"]
        self.out_of_band_weight = state["out_of_band_weight"]
        self._rate = dict(zip(state["ids"], state["rates"]))
        self._seen = dict(zip(state["ids"], state["seen"]))


@dataclasses.dataclass
class FillResult:
    """What `fill_batch` kept and why it stopped."""

    groups: List[Any]  # kept groups, in the order they were sampled
    kept: int
    dropped_too_easy: int  # pass rate > high
    dropped_too_hard: int  # pass rate < low
    rounds: int  # calls of sample_group_fn
    observed: List[Tuple[Any, float]]  # (prompt, pass rate) of every sampled group, kept or not
    message: Optional[str] = None  # one line when the batch came back short, else None


def fill_batch(sample_group_fn: Callable[[List[Any]], Sequence[Tuple[Any, float]]],
               prompt_pool: Iterable[Any], batch_prompts: int, band: Tuple[float, float],
               max_rounds: int) -> FillResult:
    """Sample groups until `batch_prompts` of them lie in `band`, or `max_rounds` rollouts ran,
    or the pool ran dry.

    Each round draws as many prompts from `prompt_pool` as the batch still lacks and calls
    `sample_group_fn(prompts)`, which returns one `(group, pass_rate)` per prompt, in order.
    Groups in band are kept. A short batch is returned, not an error: `message` says so in one
    line for the log. Feed `observed` to `PassRateHistory.update` to down-weight the dropped.
    """
    low, high = band
    _check_band(low, high)
    if batch_prompts < 1 or max_rounds < 1:
        raise ValueError(f"batch_prompts={batch_prompts} and max_rounds={max_rounds} must be >= 1")
    pool: Iterator[Any] = iter(prompt_pool)
    result = FillResult([], 0, 0, 0, 0, [])
    exhausted = False
    while result.kept < batch_prompts and result.rounds < max_rounds and not exhausted:
        want = batch_prompts - result.kept
        prompts = list(itertools.islice(pool, want))
        exhausted = len(prompts) < want
        if not prompts:
            break
        sampled = list(sample_group_fn(prompts))
        if len(sampled) != len(prompts):
            raise ValueError(f"sample_group_fn returned {len(sampled)} groups for "
                             f"{len(prompts)} prompts; it must return one (group, pass_rate) "
                             "per prompt")
        result.rounds += 1
        for prompt, (group, rate) in zip(prompts, sampled):
            rate = float(rate)
            result.observed.append((prompt, rate))
            if rate > high:
                result.dropped_too_easy += 1
            elif rate < low:
                result.dropped_too_hard += 1
            else:
                result.groups.append(group)
                result.kept += 1
    if result.kept < batch_prompts:
        why = ("the prompt pool ran out" if exhausted
               else f"the limit of {max_rounds} rounds (rl.max_refill_rounds) was hit")
        result.message = (
            f"fill_batch: kept {result.kept}/{batch_prompts} prompt groups after "
            f"{result.rounds} rounds, {why}; dropped {result.dropped_too_easy} too easy (pass "
            f"rate > {high}) and {result.dropped_too_hard} too hard (< {low}); training on a "
            "short batch (widen rl.band_low/rl.band_high or raise rl.max_refill_rounds)")
    return result
