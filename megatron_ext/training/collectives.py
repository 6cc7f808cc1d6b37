"""The one way the project reduces numbers across ranks.

Every collective here puts its tensor on the device its group's backend serves (CUDA for NCCL,
CPU for gloo) and hands the result back where the caller had it. A CPU tensor in an NCCL
collective crashes on the first GPU run ("No backend type associated with device type cpu"),
and no CPU test can see that; a helper that knows its group's device cannot make the mistake.
We chose this over a `cpu:gloo,cuda:nccl` default group: it needs no second backend on every
group megatron makes (TP, PP, DP, CP are NCCL-only on GPU), and host-side bookkeeping is a few
floats per step, whose copy to the GPU costs nothing next to a step.
"""
from __future__ import annotations

import pickle
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_device(group=None) -> torch.device:
    """The device a collective over `group` (None: the world) must use."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over `group` (None: the world), as a new tensor on `tensor`'s device;
    `tensor` itself when no process group exists (one process, nothing to reduce)."""
    if not dist.is_initialized():
        return tensor
    on_group = tensor.to(group_device(group))
    if on_group is tensor:
        on_group = tensor.clone()
    dist.all_reduce(on_group, op=_OPS[op], group=group)
    return on_group.to(tensor.device)


def reduce_floats(values: Sequence[float], group=None, op: str = "sum",
                  contribute: bool = True) -> List[float]:
    """Host numbers reduced over `group` in fp64. A rank with `contribute=False` adds zeros
    (for `sum`; `max` expects non-negative statistics): that is how last-stage statistics
    reach every rank of the world without double counting TP copies."""
    t = torch.tensor([float(v) for v in values] if contribute else [0.0] * len(values),
                     dtype=torch.float64)
    return all_reduce(t, group, op).tolist()


def gather_objects(obj, dst: int = 0, group: Optional[dist.ProcessGroup] = None):
    """Every rank's `obj` (pickled; host objects), in group rank order, on global rank `dst`;
    None on the other ranks."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)  # torch picks the group's device
    return out


def broadcast_object(obj, src: int = 0, group: Optional[dist.ProcessGroup] = None):
    """`obj` of rank `src` on every rank (pickled; small host objects only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)  # torch picks the group's device
    return box[0]


def broadcast_list(items: Optional[list], src: int, group: Optional[dist.ProcessGroup] = None) -> list:
    """Rank `src`'s list of host objects on every rank: its pickled size in one broadcast, the
    bytes in a second only when the list is not empty. For lists that are usually empty (a
    generation engine's finished rows, checked every few tokens), where broadcast_object's two
    collectives and pickling cost more than the work they report."""
    if not dist.is_initialized():
        return list(items or [])
    device, mine = group_device(group), dist.get_rank() == src
    data = pickle.dumps(items) if mine and items else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    if int(size) == 0:
        return []
    if mine:
        dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device),
                       src=src, group=group)
        return list(items)
    buffer = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src, group=group)
    return pickle.loads(buffer.cpu().numpy().tobytes())
