"""Fixed-length training rows from variable-length examples: packed end to end, or padded."""
from __future__ import annotations

from typing import List, Tuple

import torch

from megatron_ext.data.examples import Example


def pack_documents(examples: List[Example], row_len: int, pad_id: int, packed: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Rows of `row_len` tokens (seq_len + 1: inputs and shifted labels), their loss masks,
    each token's document number within its row (the padding is one more document), and how
    many examples were truncated.

    Packing fills each row greedily with whole examples; an example that does not fit starts
    the next row, and one longer than a row is truncated. Without packing each example gets its
    own padded row."""
    rows, masks, docs, truncated = [], [], [], 0
    cur_t: List[int] = []
    cur_m: List[int] = []
    cur_d: List[int] = []

    def flush():
        nonlocal cur_t, cur_m, cur_d
        if cur_t:
            pad = row_len - len(cur_t)
            rows.append(cur_t + [pad_id] * pad)
            masks.append(cur_m + [0] * pad)
            docs.append(cur_d + [cur_d[-1] + 1] * pad)
        cur_t, cur_m, cur_d = [], [], []

    for ex in examples:
        toks, mask = ex.tokens, ex.loss_mask
        if len(toks) > row_len:
            toks, mask, truncated = toks[:row_len], mask[:row_len], truncated + 1
        if not packed or len(cur_t) + len(toks) > row_len:
            flush()
        cur_d += [cur_d[-1] + 1 if cur_d else 0] * len(toks)
        cur_t += toks
        cur_m += mask
    flush()
    if not rows:
        raise ValueError("the dataset is empty: no examples to train on; check data.path / "
                         "data.num_samples")
    return (torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long),
            torch.tensor(docs, dtype=torch.long), truncated)


def pack(examples: List[Example], row_len: int, pad_id: int,
         packed: bool = True) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """pack_documents without the document numbers."""
    tokens, mask, _, truncated = pack_documents(examples, row_len, pad_id, packed)
    return tokens, mask, truncated


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """`[b, s]` document numbers (non-decreasing along a row) -> positions that restart at 0
    where a document starts."""
    s = documents.shape[1]
    index = torch.arange(s, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
