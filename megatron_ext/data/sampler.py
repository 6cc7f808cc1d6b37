"""Deterministic global-batch sampling over the DP group, resumable from consumed samples."""
from __future__ import annotations

from typing import List

import torch


class GlobalBatchSampler:
    """Each optimizer step takes the next `global_batch_size` indices of a per-epoch random
    permutation (seeded by seed and epoch); micro-batch i of DP rank r is the slice
    [i*mbs*dp + r*mbs, ... + mbs) of that global batch, so the samples of a step do not depend
    on the DP size. `consumed_samples` is the whole position: save it to resume exactly."""

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0):
        if num_samples < 1:
            raise ValueError("the dataset has no samples; check the data config")
        self.n, self.gbs, self.mbs = num_samples, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples = consumed_samples
        self._perm_epoch, self._perm = -1, None

    @property
    def num_microbatches(self) -> int:
        return self.gbs // (self.mbs * self.dp_size)

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[offset])

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = state["consumed_samples"]

    def next_step(self) -> List[List[int]]:
        """Sample indices of this rank's micro-batches for the next optimizer step."""
        base = self.consumed_samples
        micro = []
        for i in range(self.num_microbatches):
            start = base + i * self.mbs * self.dp_size + self.dp_rank * self.mbs
            micro.append([self._index(p) for p in range(start, start + self.mbs)])
        self.consumed_samples += self.gbs
        return micro
