"""Move weights between the full single-process layout and a TP/PP-sharded one.

Names are GPTModel's with global layer numbers, so a full state dict is layout-free. Used to
start any layout from the same initial weights (parity checks) and to gather a full copy of
weights or gradients (the layout-parity comparisons); models/init.py draws initial weights in the full
layout and cuts them with tp_shard."""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from parallel.topology import Topology

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def global_names(chunk) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """(layout-free name, parameter) for every parameter of a chunk."""
    model = _unwrap(chunk)
    numbers = [layer.layer_number - 1 for layer in model.decoder.layers] if hasattr(
        model, "decoder") else []
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            name = f"decoder.layers.{numbers[int(match.group(1))]}." + name[match.end():]
        yield name, param


def _is_glu_fc1(name: str, model) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and model.config.gated_linear_unit


def tp_shard(full: torch.Tensor, param, name: str, model, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s part of a full (one-process layout) tensor, as megatron lays it out:
    QKV rows are grouped by query group, so a plain chunk is right; SwiGLU's fc1 holds
    [gate_r; up_r]."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, model):  # [gate; up]: each rank holds its slice of both halves
        return torch.cat([h.chunk(tp, dim=dim)[rank] for h in full.chunk(2, dim=dim)], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def _unshard(parts: List[torch.Tensor], param, name: str, model) -> torch.Tensor:
    if len(parts) == 1 or not getattr(param, "tensor_model_parallel", False):
        return parts[0]
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def load_full_state(chunks, full: Dict[str, torch.Tensor], topo: Topology) -> None:
    """Copy each rank's shard of a full (single-process) state dict into the model."""
    tp, rank = topo.dims.tp, topo.tp_rank
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, param in global_names(chunk):
            if name == "output_layer.weight" and name not in full:
                name = "embedding.word_embeddings.weight"  # tied: the last stage's copy
            if name not in full:
                raise KeyError(f"parameter {name} is missing from the full state dict; it "
                               "was made for another model shape")
            shard = tp_shard(full[name], param, name, model, tp, rank)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: full shape {tuple(full[name].shape)} gives a shard "
                                 f"of {tuple(shard.shape)}, the model holds "
                                 f"{tuple(param.shape)}; the model shapes differ")
            param.copy_(shard)
            if hasattr(param, "main_param") and param.main_param is not None:
                param.main_param.copy_(shard)


@torch.no_grad()
def gather_full_state(chunks, topo: Topology, grads: bool = False) -> Optional[Dict[str, torch.Tensor]]:
    """The full state (or DDP main_grad buffers) on global rank 0; None elsewhere."""
    tp_group = topo.tp_group
    local: Dict[str, torch.Tensor] = {}
    for chunk in chunks:
        model = _unwrap(chunk)
        for name, param in global_names(chunk):
            tensor = (param.main_grad if grads else param).detach().float().contiguous()
            if getattr(param, "tensor_model_parallel", False) and topo.dims.tp > 1:
                parts = [torch.empty_like(tensor) for _ in range(topo.dims.tp)]
                dist.all_gather(parts, tensor, group=tp_group)
                tensor = _unshard(parts, param, name, model)
            local[name] = tensor.cpu()
    owner = topo.tp_rank == 0 and topo.dp_rank == 0 and topo.cp_rank == 0
    gathered = [None] * dist.get_world_size() if topo.rank == 0 else None
    dist.gather_object(local if owner else {}, gathered, dst=0, group=dist.group.WORLD)
    if topo.rank != 0:
        return None
    full: Dict[str, torch.Tensor] = {}
    for part in gathered:
        for name, tensor in part.items():
            if name in full and name.startswith(("embedding.", "output_layer.")):
                continue  # a tied embedding lives on the first and the last stage
            full[name] = tensor
    return full
