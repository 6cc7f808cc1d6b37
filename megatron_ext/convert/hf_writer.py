"""Write named tensors that arrive one by one, in an order planned ahead from their shapes, into
Hugging Face's `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`,
each tensor's bytes straight to its file: the writer holds no tensor, whatever the shard size.

safetensors' save_file needs a whole shard in memory, but its format is a little-endian u64
header size, a JSON header of every tensor's dtype, shape and [begin, end) byte offsets
(padded with spaces to 8 bytes), then the raw bytes in that order; with the plan known, the
header of a shard is written first and its tensors follow as they come."""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Sequence, Tuple

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class ShardWriter:
    """`plan`: (name, dtype, shape) of every tensor, in the order add() receives them."""

    def __init__(self, out: str, plan: Sequence[Tuple[str, torch.dtype, Sequence[int]]],
                 max_shard_bytes: int):
        shards: List[List[Tuple[str, torch.dtype, Sequence[int]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = _nbytes(entry)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        self.out, self.total = out, sum(_nbytes(e) for e in plan)
        self.order, self.headers = [], {}  # order: (entry, its file, last of the file)
        for i, entries in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            self.headers[file] = _header(entries)
            self.order += [(e, file, j == len(entries) - 1) for j, e in enumerate(entries)]
        self.next, self._file = 0, None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        (planned, dtype, shape), file, last = self.order[self.next]
        if (name, tensor.dtype, list(tensor.shape)) != (planned, dtype, list(shape)):
            raise ValueError(f"export wrote {name} {tensor.dtype} {list(tensor.shape)} where its "
                             f"plan has {planned} {dtype} {list(shape)}")
        if self._file is None:
            self._file = open(os.path.join(self.out, file), "wb")
            self._file.write(self.headers[file])
        self._file.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
        self.next += 1
        if last:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Write the index, once every planned tensor is written."""
        if self.next != len(self.order):
            raise ValueError(f"export wrote {self.next} of {len(self.order)} planned tensors")
        weight_map = {name: file for (name, _, _), file, _ in self.order}
        with open(os.path.join(self.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f,
                      indent=2)


def _nbytes(entry) -> int:
    _, dtype, shape = entry
    return dtype.itemsize * int(torch.Size(shape).numel())


def _header(entries) -> bytes:
    """The safetensors header (size, JSON) of tensors stored back to back in this order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPES:
            raise ValueError(f"export cannot write {name} of dtype {dtype}")
        end = offset + _nbytes((name, dtype, shape))
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text
