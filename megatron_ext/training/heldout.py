"""Teacher-forced evaluation on held-out rows: loss, and greedy exact match (a row counts as
solved when the argmax at every response position is the reference token, i.e. exactly when
greedy decoding from the prompt reproduces the whole reference solution). SFT reports it as its
eval; RL reports it beside its generated-answer accuracy."""
from __future__ import annotations

import functools
import math
from typing import Dict

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_ext.data.dataset import TokenRows
from megatron_ext.training import collectives
from megatron_ext.training.engine import ModelUnit, metrics

EVAL_METRICS = metrics("loss", "count", "solved", "rows")


def _eval_stats(vocab_size: int, cp_group, batch: Dict[str, torch.Tensor], logits: torch.Tensor):
    full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
    mask, labels = batch["loss_mask"], batch["labels"]
    nll = F.cross_entropy(full.reshape(-1, vocab_size), labels.reshape(-1),
                          reduction="none").view_as(mask)
    # per row: response tokens in this CP shard, and how many of them greedy gets wrong
    per_row = torch.stack([mask.sum(1), ((full.argmax(-1) != labels).float() * mask).sum(1)])
    if cp_group is not None:  # a row's tokens are spread over the CP ranks
        per_row = collectives.all_reduce(per_row, cp_group)
    rows = per_row[0] > 0
    first = float(cp_group is None or torch.distributed.get_rank(cp_group) == 0)  # rows once
    loss_sum = (nll * mask).sum()
    return loss_sum, mask.sum().to(torch.int), {
        "loss": loss_sum, "count": mask.sum(), "solved": (rows & (per_row[1] == 0)).sum() * first,
        "rows": rows.sum() * first}


def heldout_lm(unit: ModelUnit, rows: TokenRows, vocab_size: int) -> Dict[str, float]:
    """`loss` and `exact_match` over every held-out row, split over the DP ranks (the last
    round padded with masked copies)."""
    topo, mbs = unit.topo, unit.micro_batch_size
    dp, dp_rank = topo.dims.dp, topo.dp_rank
    per_round = mbs * dp
    batches = []
    for r in range(math.ceil(len(rows) / per_round)):
        idx = [r * per_round + dp_rank * mbs + j for j in range(mbs)]
        batch = rows.batch([i % len(rows) for i in idx])
        batch["loss_mask"] *= torch.tensor([[float(i < len(rows))] for i in idx])
        batches.append(unit.place(batch))
    cp_group = topo.cp_group if topo.dims.cp > 1 else None
    outputs = unit.forward_only(batches, functools.partial(_eval_stats, vocab_size, cp_group))
    v = unit.reduce(outputs, EVAL_METRICS)
    return {"loss": v["loss"] / max(v["count"], 1.0),
            "exact_match": v["solved"] / max(v["rows"], 1.0), "samples": int(v["rows"])}
