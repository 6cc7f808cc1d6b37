"""Generation within a bounded number of sequence slots: `generate` over any number of prompts
while the engine holds at most `num_slots` sequences (and their KV cache) at once.

An engine whose `generate` takes `num_slots` schedules the prompts through its slots itself
(continuous batching); for one that does not, the prompts go in consecutive batches of
`num_slots` and the Rollouts are joined, which bounds the memory the same way."""
from __future__ import annotations

import dataclasses
import inspect
from typing import List, Sequence

import torch
import torch.nn.functional as F

from megatron_ext.models.generate import Rollout, SamplingParams, generate


def takes_num_slots() -> bool:
    return "num_slots" in inspect.signature(generate).parameters


def join_rollouts(parts: List[Rollout], pad_id: int) -> Rollout:
    """The rows of `parts` in order; `[b, L]` tensors right-padded to the longest L (tokens
    with pad_id, masks and log-probs with 0), `[b]` tensors and lists concatenated."""
    if len(parts) == 1:
        return parts[0]
    length = max(p.tokens.size(1) for p in parts)
    joined = {}
    for f in dataclasses.fields(Rollout):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], torch.Tensor) and values[0].dim() == 2:
            fill = pad_id if f.name == "tokens" else 0
            values = [F.pad(v, (0, length - v.size(1)), value=fill) for v in values]
        joined[f.name] = (torch.cat(values) if isinstance(values[0], torch.Tensor)
                          else [x for v in values for x in v])
    return Rollout(**joined)


def generate_in_slots(model, prompts: Sequence[Sequence[int]], tokenizer, params: SamplingParams,
                      *, num_slots: int, **kwargs) -> Rollout:
    """`generate(model, prompts, tokenizer, params, **kwargs)` holding at most `num_slots`
    sequences at once."""
    if num_slots < 1:
        raise ValueError(f"num_slots={num_slots} must be >= 1 (sequences held at once)")
    if len(prompts) <= num_slots:
        return generate(model, prompts, tokenizer, params, **kwargs)
    if takes_num_slots():
        return generate(model, prompts, tokenizer, params, num_slots=num_slots, **kwargs)
    parts = [generate(model, prompts[i:i + num_slots], tokenizer, params, **kwargs)
             for i in range(0, len(prompts), num_slots)]
    return join_rollouts(parts, tokenizer.pad_id)
