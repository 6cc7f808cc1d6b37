"""Pretraining samples from megatron's indexed datasets (data=indexed): megatron-core's own
BlendedMegatronDatasetBuilder + GPTDataset over memory-mapped PREFIX.bin/.idx pairs, blended
by weight, split into train / held-out, with the sample indices cached beside the data.

Only the first and last pipeline stages read tokens (the embedding and the loss need them);
every other rank gets zero tensors of the right shapes and never opens a .bin file. The
samples of a step are positions in the blend drawn by the recipe's GlobalBatchSampler, whose
`consumed_samples` makes a resume continue at the exact sample."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list

SPLITS = ("train", "valid", "test")


class MegatronTokenizerView:
    """What GPTDataset asks of a tokenizer (eod, pad, vocab_size and a cache identity); the
    samples are already token ids, so nothing is encoded here. A pad equal to EOS (HF
    tokenizers without a pad token) becomes megatron's -1, which no sample contains."""

    def __init__(self, tokenizer):
        self.eod = tokenizer.eos_id
        self.pad = -1 if tokenizer.pad_id == tokenizer.eos_id else tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = {"class": type(tokenizer).__name__, "eod": self.eod,
                                   "vocab_size": self.vocab_size}


def parse_blend(blend: List) -> Tuple[List[str], Optional[List[float]]]:
    """data.blend `[w1, prefix1, w2, prefix2, ...]` or `[prefix1, ...]` as megatron's
    (prefixes, weights)."""
    return get_blend_from_list([str(x) for x in blend])


def cache_dir(cfg) -> str:
    """data.cache_dir, else `cache/` beside the first dataset of the blend."""
    prefixes, _ = parse_blend(cfg.data.blend)
    return cfg.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])),
                                              "cache")


def build_splits(cfg, tokenizer, sizes: List[int], reads_tokens: bool) -> List:
    """[train, valid, test] datasets (None where a split has no share or where this rank
    reads no tokens). Every rank must call it: megatron's builder meets at a world barrier so
    that rank 0 writes the cached indices before the others read them."""
    d = cfg.data
    config = GPTDatasetConfig(
        random_seed=cfg.seed, sequence_length=cfg.train.seq_len, blend=parse_blend(d.blend),
        split=",".join(str(x) for x in d.split), path_to_cache=cache_dir(cfg),
        tokenizer=MegatronTokenizerView(tokenizer), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.005)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: reads_tokens, config).build()


class IndexedSamples:
    """One split of the blend as the recipe's data source: `len` samples of seq_len + 1 tokens,
    `batch(indices)` the micro-batch dict of TokenRows.batch."""

    def __init__(self, dataset, num_samples: int, seq_len: int):
        if dataset is not None and len(dataset) < num_samples:
            raise ValueError(f"the blend gives {len(dataset)} samples, fewer than the "
                             f"{num_samples} asked; lower train.steps or train.eval_samples")
        self.dataset, self.num_samples, self.seq_len = dataset, num_samples, seq_len

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        b, s = len(indices), self.seq_len
        if self.dataset is None:  # a middle pipeline stage: only the shapes matter
            zeros = torch.zeros(b, s, dtype=torch.long)
            return {"tokens": zeros, "labels": zeros.clone(), "loss_mask": torch.zeros(b, s),
                    "position_ids": torch.arange(s).expand(b, -1).contiguous()}
        samples = [self.dataset[int(i)] for i in indices]
        return {
            "tokens": torch.stack([x["tokens"] for x in samples]),
            "labels": torch.stack([x["labels"] for x in samples]),
            "loss_mask": torch.stack([x["loss_mask"] for x in samples]).float(),
            "position_ids": torch.stack([x["position_ids"] for x in samples]),
        }

    def dataset_ids(self, indices: List[int]) -> List[int]:
        """Which dataset of the blend each sample came from (a blend of one: all 0)."""
        return [int(self.dataset[int(i)].get("dataset_id", 0)) for i in indices]


def build_indexed(cfg, topo, tokenizer) -> Tuple[IndexedSamples, Optional[IndexedSamples]]:
    """(train samples, held-out samples or None when data.split gives the held-out no share)."""
    t = cfg.train
    train_n, valid_n = t.steps * t.global_batch_size, t.eval_samples
    has_valid = len(cfg.data.split) > 1 and cfg.data.split[1] > 0
    sizes = [max(train_n, 1), valid_n if has_valid else 0, 0]
    reads = topo is None or topo.is_first_stage or topo.is_last_stage
    train, valid, _ = build_splits(cfg, tokenizer, sizes, reads)
    held = IndexedSamples(valid, valid_n, t.seq_len) if has_valid else None
    return IndexedSamples(train, max(train_n, 1), t.seq_len), held  # steps=0: one, unused
