"""Write named tensors that arrive one by one, in an order planned from their sizes, into
Hugging Face's `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.

The plan (every name and its bytes, known before any data is read) fixes the shard count for
the file names up front; a shard is written and dropped as soon as its last tensor arrives, so
the writer holds at most one shard."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import torch


class ShardWriter:
    def __init__(self, out: str, plan: Sequence[Tuple[str, int]], max_shard_bytes: int):
        shards: List[List[str]] = [[]]
        size = 0
        for name, nbytes in plan:
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        self.out, self.total = out, sum(nbytes for _, nbytes in plan)
        self.file_of: Dict[str, str] = {}
        self._last: Dict[str, str] = {}  # a shard's last name -> its file
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            self.file_of.update({n: file for n in names})
            self._last[names[-1]] = file
        self._pending: Dict[str, torch.Tensor] = {}
        self._written = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.file_of or name in self._written or name in self._pending:
            raise ValueError(f"tensor {name} is not in the export plan or came twice")
        self._pending[name] = tensor
        file = self._last.get(name)
        if file is not None:
            from safetensors.torch import save_file
            save_file(self._pending, os.path.join(self.out, file), metadata={"format": "pt"})
            self._written.update(self._pending)
            self._pending = {}

    def close(self) -> None:
        """Write the index, once every planned tensor is written."""
        missing = [n for n in self.file_of if n not in self._written]
        if missing:
            raise ValueError(f"export wrote no tensor for {missing[:5]}")
        with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": self.file_of}, f,
                      indent=2)
