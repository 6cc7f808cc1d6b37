"""Read one tensor, or one layer of it, from a torch_dist checkpoint's files in this process:
no process group, no model, no resharding of the whole checkpoint, so `convert export` holds one
layer at a time whatever layout wrote it.

torch.distributed.checkpoint's `.metadata` lists, per key, the global shape and the chunks
(offsets, sizes) the ranks wrote; each chunk is a torch.save'd tensor at (file, offset, length)
of a `.distcp` file, read here as torch's FileSystemReader.read_data reads it. megatron prepends
the global layer axis to the keys of `decoder.layers.*` (one key for all layers), so region
[layer] of such a key is that layer's TP shards (fc1's as [gate; up], QKV's as whole query
groups: the TP1 layout once assembled)."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.utils import _create_file_view

from megatron_ext.training.checkpoint.integrity import unsafe_pickle


class DistCheckpoint:
    """The tensors of the dist checkpoint folder `path` (its `.metadata`, checked to reference
    nothing but checkpoint metadata before it is unpickled)."""

    def __init__(self, path: str):
        problem = unsafe_pickle(path) if os.path.isfile(os.path.join(path, ".metadata")) else (
            "no .metadata (not a torch_dist checkpoint folder)")
        if problem:
            raise ValueError(f"checkpoint {path}: {problem}")
        self.path = path
        metadata = FileSystemReader(path).read_metadata()
        self.tensors: Dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}
        self._storage = metadata.storage_data

    def shape(self, key: str, layer: Optional[int] = None) -> torch.Size:
        size = self.tensors[key].size
        return size if layer is None else size[1:]

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """Tensor `key`, or its [layer] along the prepended layer axis, from the chunks that
        cover it (a chunk that is the whole region is returned without a copy)."""
        meta = self.tensors[key]
        lo = [0] * len(meta.size)
        hi = list(meta.size)
        if layer is not None:
            lo[0], hi[0] = layer, layer + 1
        out, filled = None, 0
        for index, chunk in enumerate(meta.chunks):
            start = [max(a, o) for a, o in zip(lo, chunk.offsets)]
            stop = [min(b, o + s) for b, o, s in zip(hi, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(start, stop)):
                continue
            data = self._chunk(key, chunk.offsets, index)
            if start == lo and stop == hi and list(chunk.offsets) == lo:
                return data[0] if layer is not None else data
            if out is None:
                out = torch.empty([b - a for a, b in zip(lo, hi)], dtype=meta.properties.dtype)
            source, target = data, out
            for dim, (a, b) in enumerate(zip(start, stop)):
                source = source.narrow(dim, a - chunk.offsets[dim], b - a)
                target = target.narrow(dim, a - lo[dim], b - a)
            target.copy_(source)
            filled += source.numel()
            del data, source
        if out is None or filled != out.numel():
            raise ValueError(f"checkpoint {self.path}: the chunks of {key} do not cover "
                             f"{'layer ' + str(layer) if layer is not None else 'the tensor'}")
        return out[0] if layer is not None else out

    def _chunk(self, key: str, offsets, index: int) -> torch.Tensor:
        info = self._storage[MetadataIndex(key, offsets, index)]
        if info.transform_descriptors:
            raise ValueError(f"checkpoint {self.path}: {key} is stored with transforms "
                             f"{list(info.transform_descriptors)}, which export does not read")
        with open(os.path.join(self.path, info.relative_path), "rb") as f:
            return torch.load(_create_file_view(f, info.offset, info.length), map_location="cpu",
                              weights_only=True)
