"""Bytes that live for the whole run: parameters, fp32 grad buffers and optimizer state.

megatron's optimizer on our config: Adam keeps exp_avg and exp_avg_sq in fp32 for every
parameter it updates, and torch's AdamW (used where TE/apex are absent) a 4-byte step per
tensor. bf16 parameters get fp32 master copies. The distributed optimizer updates only this DP
rank's slice of each grad buffer, so moments and master copies shrink by DP (x CP), while the
fp32 master of an fp32 parameter is a view of the model's own storage.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

from megatron_ext.config.schema import Config
from megatron_ext.memory.buffers import chunk_buffers
from megatron_ext.memory.model_terms import ModelShape, chunk_params, stage_chunks

DEFAULT_BUCKET = 40_000_000  # megatron DDP's bucket size when overlap_grad_reduce is on


@dataclasses.dataclass(frozen=True)
class StaticBytes:
    params: int
    grads: int
    adam_moments: int
    adam_steps: int
    master_params: int

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


def static_bytes(cfg: Config, shape: ModelShape, pp_rank: int, dp: int, dp_rank: int,
                 te_spec: bool) -> StaticBytes:
    """Static bytes of pipeline rank pp_rank at data-parallel rank dp_rank of dp; dp counts
    DP x CP, the group gradients are reduced and the optimizer sharded over."""
    p = cfg.parallel
    vpp = p.vpp or 1
    distributed = p.use_distributed_optimizer
    params = grads = moments = steps = masters = 0
    for i, (layers, first, last) in enumerate(stage_chunks(shape, p.pp, vpp, pp_rank)):
        plist = chunk_params(shape, layers, first, last, p.pp, te_spec)
        bucketed = p.overlap_grad_reduce and i == 0 and pp_rank == 0
        bucket = max(DEFAULT_BUCKET, 1_000_000 * dp) if bucketed else None
        buffers = chunk_buffers(plist, dp, distributed, bucket)
        grads += sum(4 * b.numel for b in buffers)  # grad_reduce_in_fp32
        if distributed:
            params += sum(b.param_bytes * b.numel for b in buffers)
        else:
            params += sum(q.numel * q.nbytes_per_elem for q in plist)
        owner = {name: b for b in buffers for name in b.ranges}
        for q in plist:
            n = owner[q.name].shard(q.name, dp, dp_rank) if distributed else q.numel
            if n:
                moments += 8 * n
                steps += 4
                masters += 4 * n if q.nbytes_per_elem != 4 else 0
    return StaticBytes(params, grads, moments, steps, masters)
