"""The training rows and held-out set of a run, built identically on every rank."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from megatron_ext.config.schema import Config
from megatron_ext.data.examples import DataError, encode_example, read_jsonl, task_examples
from megatron_ext.data.packing import pack
from megatron_ext.data.task import ArithmeticTask


@dataclasses.dataclass
class TokenRows:
    tokens: torch.Tensor  # [n, seq_len + 1]
    loss_mask: torch.Tensor  # [n, seq_len + 1]; position t weights the target tokens[t]
    stats: Dict[str, int]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        """Inputs, shifted labels, the labels' loss mask and positions for a micro-batch."""
        rows, mask = self.tokens[indices], self.loss_mask[indices]
        seq = rows.shape[1] - 1
        return {
            "tokens": rows[:, :-1].contiguous(),
            "labels": rows[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].float().contiguous(),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(rows.shape[0], -1).contiguous(),
        }


def _pairs(cfg: Config, split: str, path: Optional[str]):
    if cfg.data.source == "task":
        t = cfg.data.task
        task = ArithmeticTask(t.seed, t.min_ops, t.max_ops, t.max_operand)
        n = cfg.data.num_samples if split == "train" else cfg.train.eval_samples
        return task_examples(task, n, split), {}
    stats: Dict[str, int] = {}
    key = "data.path" if split == "train" else "data.valid_path"
    return list(read_jsonl(path, cfg.data.on_malformed, stats, key)), stats


def build_rows(cfg: Config, tokenizer, split: str = "train") -> TokenRows:
    """Packed training rows (split="train") or one padded row per held-out example."""
    path = cfg.data.path if split == "train" else cfg.data.valid_path
    if cfg.data.source == "jsonl" and split != "train" and not path:
        raise DataError("held-out rows of a JSONL run need data.valid_path")
    pairs, stats = _pairs(cfg, split, path)
    if not pairs:
        if cfg.data.source == "task":
            raise DataError(f"the built-in task gave no {split} examples "
                            f"(data.num_samples={cfg.data.num_samples}, train.eval_samples="
                            f"{cfg.train.eval_samples}); raise them")
        skipped = stats.get("skipped", 0)
        why = (f"all {skipped} non-empty lines are malformed and data.on_malformed=skip "
               "passed over them" if skipped else "it has no non-empty line")
        raise DataError(f"the {split} data {path!r} is empty: {why}; give a file with at least "
                        'one {"prompt": ..., "response": ...} line')
    examples = [encode_example(tokenizer, p, r, cfg.data.loss_on_prompt or cfg.stage == "pretrain")
                for p, r in pairs]
    for i, ex in enumerate(examples):
        bad = [t for t in ex.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            where = f"{path!r} example {i + 1}" if path else f"built-in task example {i + 1}"
            raise DataError(f"{where}: token id {bad[0]} is outside the tokenizer vocab "
                            f"[0, {tokenizer.vocab_size}) of data.tokenizer="
                            f"{cfg.data.tokenizer!r}; the tokenizer file is inconsistent (an "
                            "added token beyond its vocab size?): fix it or use another")
    packed = cfg.data.pack and split == "train"
    tokens, mask, truncated = pack(examples, cfg.train.seq_len + 1, tokenizer.pad_id, packed)
    stats.update(examples=len(examples), rows=int(tokens.shape[0]), truncated=truncated)
    return TokenRows(tokens, mask, stats)


def build_sources(cfg: Config, topo, tokenizer):
    """(train source, held-out source or None) of the SFT/pretraining recipe, chosen by
    data.source: each has `len` and `batch(indices)` (TokenRows, or IndexedSamples for
    megatron's indexed datasets, read only where a pipeline stage needs tokens)."""
    if cfg.data.source == "indexed":
        from megatron_ext.data.indexed import build_indexed
        return build_indexed(cfg, topo, tokenizer)
    held = (build_rows(cfg, tokenizer, "heldout")
            if cfg.data.source == "task" or cfg.data.valid_path else None)
    return build_rows(cfg, tokenizer, "train"), held
