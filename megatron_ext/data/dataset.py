"""The training rows and held-out set of a run, built identically on every rank."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

from megatron_ext.config.schema import Config
from megatron_ext.data.chat import encode_chat
from megatron_ext.data.examples import (DataError, Example, encode_example, read_jsonl,
                                        task_examples)
from megatron_ext.data.packing import document_positions, pack_documents
from megatron_ext.data.task import ArithmeticTask


@dataclasses.dataclass
class TokenRows:
    tokens: torch.Tensor  # [n, seq_len + 1]
    loss_mask: torch.Tensor  # [n, seq_len + 1]; position t weights the target tokens[t]
    stats: Dict[str, int]
    # [n, seq_len + 1] document number of each token in its row, when packed documents are
    # isolated (data.isolate_documents): the batches then carry document_ids
    documents: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        """Inputs, shifted labels, the labels' loss mask and positions for a micro-batch; with
        isolated documents also their document ids, positions restarting at 0 in each, and no
        loss on a target that belongs to the next document."""
        rows, mask = self.tokens[indices], self.loss_mask[indices]
        seq = rows.shape[1] - 1
        batch = {
            "tokens": rows[:, :-1].contiguous(),
            "labels": rows[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].float().contiguous(),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(rows.shape[0], -1).contiguous(),
        }
        if self.documents is not None:
            docs = self.documents[indices]
            batch["document_ids"] = docs[:, :-1].contiguous()
            batch["position_ids"] = document_positions(batch["document_ids"])
            batch["loss_mask"] *= (docs[:, 1:] == docs[:, :-1]).float()
        return batch


def _pairs(cfg: Config, split: str, path: Optional[str]):
    if cfg.data.source == "task":
        t = cfg.data.task
        task = ArithmeticTask(t.seed, t.min_ops, t.max_ops, t.max_operand)
        n = cfg.data.num_samples if split == "train" else cfg.train.eval_samples
        return task_examples(task, n, split), {}
    stats: Dict[str, int] = {}
    key = "data.path" if split == "train" else "data.valid_path"
    return list(read_jsonl(path, cfg.data.on_malformed, stats, key)), stats


def encode_item(tokenizer, item, loss_on_prompt: bool) -> Example:
    """A (prompt, response) pair, or a chat record's messages (through the chat template)."""
    if isinstance(item, list):
        if not hasattr(tokenizer, "apply_chat_template"):
            raise DataError('a {"messages": ...} record needs a tokenizer with a chat template '
                            "(data.tokenizer=<HF tokenizer directory>); data.tokenizer has none")
        return encode_chat(tokenizer, item)
    return encode_example(tokenizer, item[0], item[1], loss_on_prompt)


def apply_overlong(examples: List[Example], row_len: int, policy: str,
                   where: str) -> Tuple[List[Example], int]:
    """data.overlong for examples longer than a row (train.seq_len + 1 tokens): "error" stops,
    "drop" removes them (counted), "truncate" keeps them for `pack` to cut (counted there)."""
    long = [i for i, ex in enumerate(examples) if len(ex.tokens) > row_len]
    if not long or policy == "truncate":
        return examples, 0
    if policy == "error":
        i = long[0]
        raise DataError(f"{where} example {i + 1} has {len(examples[i].tokens)} tokens, more "
                        f"than a row of train.seq_len + 1 = {row_len} ({len(long)} such "
                        "examples); raise train.seq_len, or set data.overlong=truncate or drop")
    skip = set(long)
    return [ex for i, ex in enumerate(examples) if i not in skip], len(long)


def summary(rows) -> str:
    """One line on what the data became: examples, rows, and the over-long ones."""
    s = getattr(rows, "stats", {})
    if "examples" not in s:
        return f"data: {len(rows)} samples"
    return (f"data: {s['examples']} examples in {s['rows']} rows; over-long: {s['truncated']} "
            f"truncated, {s['dropped']} dropped; {s.get('skipped', 0)} malformed lines skipped")


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
    examples = [encode_item(tokenizer, item, cfg.data.loss_on_prompt or cfg.stage == "pretrain")
                for item in pairs]
    for i, ex in enumerate(examples):
        bad = [t for t in ex.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            where = f"{path!r} example {i + 1}" if path else f"built-in task example {i + 1}"
            raise DataError(f"{where}: token id {bad[0]} is outside the tokenizer vocab "
                            f"[0, {tokenizer.vocab_size}) of data.tokenizer="
                            f"{cfg.data.tokenizer!r}; the tokenizer file is inconsistent (an "
                            "added token beyond its vocab size?): fix it or use another")
    packed = cfg.data.pack and split == "train"
    examples, dropped = apply_overlong(examples, cfg.train.seq_len + 1, cfg.data.overlong,
                                       repr(path) if path else "the built-in task")
    tokens, mask, docs, truncated = pack_documents(examples, cfg.train.seq_len + 1,
                                                   tokenizer.pad_id, packed)
    stats.update(examples=len(examples), rows=int(tokens.shape[0]), truncated=truncated,
                 dropped=dropped)
    return TokenRows(tokens, mask, stats, docs if packed and cfg.data.isolate_documents else None)


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
