"""Measure what a CPU training step really holds, to check the planner against.

Static state (parameters, grad buffers, optimizer state) is walked from the live objects and
counted by storage, so views into megatron's contiguous buffers count once. Activations are
the peak of live tensor bytes during forward+backward. tracemalloc cannot see tensor storage
and process RSS moves with the allocator's caching, so we read the allocator itself: with
`profile_memory=True` torch's profiler records every CPU allocation and free with the
running total of c10's ProfiledCPUMemoryReporter (the CPU allocator does not cache, so an
allocation is a live tensor). The largest total inside a window, less the total when it
opened, is the window's peak above what was live before.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def _storage_bytes(tensors: Iterable[torch.Tensor], exclude: frozenset = frozenset()) -> int:
    """Bytes of the distinct storages behind `tensors`, leaving out storages in `exclude`."""
    seen, total = set(exclude), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def static_bytes(model_chunks, optimizer) -> Dict[str, int]:
    """Bytes of parameters, fp32 grad buffers and optimizer state (Adam moments and step
    counters; fp32 master copies, i.e. optimizer parameters that are not model storage)."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    grads = [b.grad_data for chunk in model_chunks for b in chunk.buffers]
    moments, steps, masters = [], [], []
    for opt in optimizer.chained_optimizers:
        inner = opt.optimizer
        for state in inner.state.values():
            for name, value in state.items():
                if torch.is_tensor(value):
                    (steps if name == "step" else moments).append(value)
        masters += [p for group in inner.param_groups for p in group["params"]]
    return {
        "params": _storage_bytes(params),
        "grads": _storage_bytes(grads),
        "adam_moments": _storage_bytes(moments),
        "adam_steps": _storage_bytes(steps),
        "master_params": _storage_bytes(masters, frozenset(param_ptrs)),
    }


def _allocations(prof) -> list:
    """(time, bytes, bytes live, innermost op) of every CPU allocation (+) and free (-)."""
    events = []
    stack = [(node, "") for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, op = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated, op))
            continue
        stack.extend((child, node.name) for child in node.children)
    return sorted(events)


def peak_live_bytes(fn: Callable[[], object]) -> Tuple[object, int, str]:
    """(fn(), peak, op): the most CPU tensor bytes alive at once while fn runs, above what
    was live before it, and the op whose allocation reached that peak. The reporter's
    running total is updated under its lock, so it orders allocations from several threads
    (gloo's) correctly."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = _allocations(prof)
    if not events:
        return result, 0, ""
    start = events[0][2] - events[0][1]
    top = max(events, key=lambda e: e[2])
    return result, top[2] - start, top[3]


def measure_layouts(rank: int, world_size: int, out_dir: str, layouts: Dict[str, list]) -> None:
    """Entry for tests.dist._spawn.run_distributed: for each named layout (Hydra overrides)
    build the Trainer, take one step with forward+backward measured, and write
    <out_dir>/<name>.rank<r>.json with this rank's coordinates, its static bytes (counted
    after the step, when Adam's state exists) and its activation peak."""
    import json
    import os

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron.core import parallel_state as ps
    from megatron_ext.train import build_loop

    for name, overrides in layouts.items():
        cfg = compose_config(list(overrides) + [f"run.dir={out_dir}/{name}"])
        topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)
        recipe = build_loop(cfg, topo, cfg.run.dir).recipe
        policy = recipe.policy
        measured = {}
        schedule = policy._run  # forward and backward of one global batch

        def measured_schedule(*args, **kwargs):
            result, measured["peak"], measured["where"] = peak_live_bytes(
                lambda: schedule(*args, **kwargs))
            return result

        policy._run = measured_schedule
        recipe.train_step(1)
        record = {"pp_rank": topo.pp_rank, "tp_rank": topo.tp_rank, "dp_rank": topo.dp_rank,
                  "activation_peak": measured["peak"], "peak_op": measured["where"],
                  "static": static_bytes(policy.chunks, policy.optimizer)}
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(record, f)
        ps.destroy_model_parallel()
        torch.distributed.barrier()
