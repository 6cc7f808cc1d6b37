"""Fixed-length training rows from variable-length examples: packed end to end, or padded."""
from __future__ import annotations

from typing import List, Tuple

import torch

from megatron_ext.data.examples import Example


def pack(examples: List[Example], row_len: int, pad_id: int,
         packed: bool = True) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of `row_len` tokens (seq_len + 1: inputs and shifted labels) and their loss masks.

    Packing fills each row greedily with whole examples; an example that does not fit starts
    the next row, and one longer than a row is truncated (returned as the third value).
    Without packing each example gets its own padded row."""
    rows, masks, truncated = [], [], 0
    cur_t: List[int] = []
    cur_m: List[int] = []

    def flush():
        nonlocal cur_t, cur_m
        if cur_t:
            pad = row_len - len(cur_t)
            rows.append(cur_t + [pad_id] * pad)
            masks.append(cur_m + [0] * pad)
        cur_t, cur_m = [], []

    for ex in examples:
        toks, mask = ex.tokens, ex.loss_mask
        if len(toks) > row_len:
            toks, mask, truncated = toks[:row_len], mask[:row_len], truncated + 1
        if not packed or len(cur_t) + len(toks) > row_len:
            flush()
        cur_t += toks
        cur_m += mask
    flush()
    if not rows:
        raise ValueError("the dataset is empty: no examples to train on; check data.path / "
                         "data.num_samples")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long), truncated
