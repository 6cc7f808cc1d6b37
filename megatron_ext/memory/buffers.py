"""megatron DDP's contiguous param/grad buffers and the distributed optimizer's shards
(megatron-core 0.16.1, distributed/param_and_grad_buffer.py and optimizer/distrib_optimizer.py).

Replayed rather than approximated so the static bytes come out exact: with the distributed
optimizer every parameter starts 64-element aligned, every bucket is padded to a multiple of
lcm(dp, 128), and each DP rank owns the same-size slice of every bucket, padding included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from megatron_ext.memory.model_terms import Param


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One (param dtype, grad dtype) buffer of a model chunk."""

    param_bytes: int  # bytes per element of the parameters in it
    numel: int  # padded length
    ranges: Dict[str, Tuple[int, int]]  # param name -> [start, end)
    buckets: List[Tuple[int, int]]  # [start, end) of each bucket

    def shard(self, param: str, dp: int, rank: int) -> int:
        """Elements of `param` that DP rank `rank` owns (the whole param without sharding)."""
        start, end = self.ranges[param]
        for b_start, b_end in self.buckets:
            if b_start <= start < b_end:
                size = (b_end - b_start) // dp
                lo = b_start + rank * size
                return max(0, min(end, lo + size) - max(start, lo))
        raise AssertionError(f"{param} lies in no bucket")


def _layout(params: List[Param], dp: int, distributed: bool, bucket_size: Optional[int],
            param_bytes: int) -> Buffer:
    def pad(n: int, to: int) -> int:
        return -(-n // to) * to

    def end_bucket(end: int) -> int:
        return pad(end, math.lcm(dp, 128)) if distributed else end

    ranges, buckets = {}, []
    start = bucket_start = 0
    open_bucket = False
    for p in reversed(params):  # megatron walks params backwards (roughly backprop order)
        if distributed:
            start = pad(start, 64)
        new_bucket = p.shared_embedding and distributed
        if new_bucket and open_bucket:
            start = end_bucket(start)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
        end = start + p.numel
        ranges[p.name] = (start, end)
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or new_bucket:
            start = end_bucket(end)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
        else:
            start = end
    if open_bucket:
        buckets.append((bucket_start, end_bucket(end)))
    return Buffer(param_bytes, buckets[-1][1] if buckets else 0, ranges, buckets)


def chunk_buffers(params: List[Param], dp: int, distributed: bool,
                  bucket_size: Optional[int]) -> List[Buffer]:
    """The buffers of one DDP-wrapped chunk: params grouped by dtype, in first-seen order.
    `dp` is the data-parallel size including CP (gradients are reduced over both)."""
    groups: Dict[int, List[Param]] = {}
    for p in params:
        groups.setdefault(p.nbytes_per_elem, []).append(p)
    return [_layout(group, dp, distributed, bucket_size, nbytes)
            for nbytes, group in groups.items()]
