"""Fixed-shape decode passes of a ChunkDecoder, replayed from CUDA graphs on a GPU.

A CUDA graph replays fixed kernels on fixed addresses, while a decode pass of the engine has
n running rows (fewer as rows finish) attending over kv_len cache positions (one more each
tick). So a pass runs at a bucket: its rows padded to `row_bucket(n)` (powers of two up to the
group's slot count, and that count), its key length to `key_bucket(kv_len)` (a multiple of
`key_block`, at most max_len); the causal mask hides the keys past each row's position.
A pass at the group's slot count runs the whole group: static row j is the group's slot j
(the engine's groups are slots g, g + G, ... of the cache), so attention reads the group's K/V
as a strided view of the cache instead of gathering them every layer; its absent rows are
padding (a group whose slots are no arithmetic progression runs compact). Below that,
the pass's rows come first and the padding rows decode slot 0. A padding row decodes at
position max_len, the cache's scratch column, so it never writes a live slot's cache and no
real row attends to what it writes. The inputs are copied into static buffers, one set per
(chunk, rows, whole group or not), and every bucket (those and the key bucket) runs one
callable over them: on CUDA the graph `capture` recorded (one memory pool per chunk, shared
by its buckets), elsewhere the decoder itself, eagerly, over the very same buffers, which is
how the CPU tests check the bucketing. Rows are independent in every op of a layer (the
linears, norms, attention and TP collectives act per row), so padding leaves the real rows'
logits as they are, up to the reduction order a kernel picks for another shape.

Without graphs (the CPU) the keys are not padded (key_block 1): there a shape costs nothing
and padded keys cost attention. The whole-group view pays there too (benchmarks/decode_step.py
--engine: 0.98-1.23x the dynamic path's tokens/s at batch 1-128, 1 thread), but the engine
keeps the dynamic path by default off CUDA (Engine(fixed_shape=True) opts in).

Only decode passes run here; prefill (right-padded prompts of any length) stays eager, and so
does sampling: it reads the `[n, vocab]` logits this returns, with the per-request noise
index and top-p sort that the engine's sampler already runs without a host sync, and keeping
it out keeps its samples the eager path's by construction. What a call returns may be the
graph's static output: consume or copy it before the same chunk runs again (the engine
samples from or packs it in the same tick). Why a pool per chunk and not one: the graphs of
one pool may hold an output where another's intermediates lie, and with VPP the hidden
states of all this rank's chunks are packed into one message after they all ran; a chunk
runs one decode pass a tick, so its buckets never clobber each other's output before it is
used. The graphs read the weights and the KV cache at the addresses they were captured on:
the engine is built per generate() call and releases its graphs with its cache
(Engine.release, before each training step), so no graph outlives either.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from megatron_ext.models.decode import ChunkDecoder


def row_bucket(n: int, limit: int) -> int:
    """Rows a pass of n rows runs at: the smallest power of two >= n, or `limit`."""
    if not 1 <= n <= limit:
        raise ValueError(f"a decode pass of {n} rows must have 1 to {limit} (the group's slots)")
    return min(1 << (n - 1).bit_length(), limit)


def key_bucket(kv_len: int, max_len: int, block: int) -> int:
    """Cache positions a pass attending over kv_len runs at: kv_len rounded up to a multiple
    of `block`, at most max_len."""
    if not 1 <= kv_len <= max_len:
        raise ValueError(f"kv_len={kv_len} must be in [1, max_len={max_len}]")
    return min(-(-kv_len // block) * block, max_len)


def unsupported(chunks) -> Optional[str]:
    """Why `chunks` cannot decode from CUDA graphs (None: they can): not on CUDA, or a module
    with forward hooks (an offloaded network streams its weights in them; a replay runs none)."""
    hooked = [name for c in chunks for name, m in c.named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        return (f"no forward hooks on the model (found on {hooked[0] or 'the model'}: a replay "
                "would not run them)")
    device = next(chunks[0].parameters()).device
    if device.type != "cuda":
        return f"the model on a CUDA device (it is on {device})"
    return None


def capture(fn: Callable[[], torch.Tensor], pool, warmup: int = 3):
    """(graph, output): fn recorded in a CUDA graph in memory pool `pool`, after `warmup` runs
    on a side stream (torch's rule: lazy initialisations, e.g. cuBLAS and NCCL, must not land
    in the graph). fn must be idempotent: the warmup runs write the same K/V the replays do.
    The capture runs nothing: replay the graph to compute `output`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local as megatron's: other threads' CUDA calls (NCCL's watchdog) stay legal
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = fn()
    return graph, output


def progression(slots: Sequence[int]) -> Optional[slice]:
    """The slice of the cache's slots that is `slots` in order (None: there is none)."""
    if not slots:
        return None
    step = slots[1] - slots[0] if len(slots) > 1 else 1
    if step < 1 or list(slots) != list(range(slots[0], slots[0] + step * len(slots), step)):
        return None
    return slice(slots[0], slots[0] + step * len(slots), step)


class _Inputs:
    """The static inputs of chunk v at a row bucket. Compact (group None): the pass's n rows
    first, rows n.. padding. A whole group g (the bucket is its slot count): row j is the
    group's slot j, always; its absent rows are padding, and attention reads the group's
    slots as a view of the cache."""

    def __init__(self, first: bool, rows: int, hidden: int, dtype, device, scratch: int,
                 view: Optional[slice]):
        self.scratch, self.view = scratch, view
        self.x = (torch.zeros(rows, 1, dtype=torch.long, device=device) if first
                  else torch.zeros(1, rows, hidden, dtype=dtype, device=device))
        self.slots = (torch.zeros(rows, dtype=torch.long, device=device) if view is None else
                      torch.arange(view.start, view.stop, view.step, device=device))
        self.positions = torch.full((rows, 1), scratch, dtype=torch.long, device=device)
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)

    def load(self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor):
        """Copy a pass's n rows in, device copies only; the padding rows decode at the scratch
        column (of slot 0, or of their group slot): a larger pass may have left a live slot's
        position there. Returns the static row of each pass row (None: the first n)."""
        n = slots.shape[0]
        if self.view is None:
            if self.x.dtype == torch.long:
                self.x[:n].copy_(x)
                self.x[n:].zero_()
            else:  # a stale padding hidden state is finite, and rows do not mix
                self.x[:, :n].copy_(x)
            self.slots[:n].copy_(slots)
            self.slots[n:].zero_()
            self.positions[:n].copy_(positions)
            self.positions[n:].fill_(self.scratch)
            return None
        rows = (slots - self.view.start).div_(self.view.step, rounding_mode="floor")
        if self.x.dtype == torch.long:
            self.x.zero_()
        self.x.index_copy_(0 if self.x.dtype == torch.long else 1, rows, x)
        self.positions.fill_(self.scratch)
        self.positions.index_copy_(0, rows, positions)
        return rows


class DecodeGraphs:
    """Decode passes of `decoder` at fixed shapes (see the module docstring).

    groups: the engine's slot groups (the slots of each; a group without slots never runs).
    graphs: record each bucket in a CUDA graph (the model on CUDA), else run it eagerly.
    key_block: the key buckets' step (None: 128 with graphs; 1 without, where a shape costs
    nothing and padded keys cost attention). `captures` counts the buckets made so far (one
    per (chunk, rows, whole group, key bucket), not per pass)."""

    def __init__(self, decoder: ChunkDecoder, *, groups: Sequence[Sequence[int]], hidden: int,
                 dtype,
                 graphs: bool, key_block: Optional[int] = None):
        device = decoder.cache.kv.device
        missing = unsupported(decoder.models) if graphs else None
        if missing is not None:
            raise ValueError(f"CUDA graphs need {missing}; use cuda_graphs=false (or auto)")
        key_block = key_block or (128 if graphs else 1)
        if not groups or key_block < 1:
            raise ValueError(f"groups ({len(groups)}) must be >= 1 and key_block={key_block} "
                             ">= 1")
        self.decoder, self.block = decoder, key_block
        self.sizes = [len(slots) for slots in groups]
        self.views = [progression(slots) for slots in groups]
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.pools = {} if graphs else None  # chunk -> its memory pool
        self.inputs: Dict[Tuple[int, int, Optional[int]], _Inputs] = {}
        self.runs: Dict[Tuple[int, int, Optional[int], int], Callable[[], torch.Tensor]] = {}
        self.graphs = []
        self.captures = 0

    def __call__(self, v: int, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                 kv_len: int, group: int) -> torch.Tensor:
        """ChunkDecoder.forward of a decode pass (t = 1, every length 1) of slots of group
        `group`: x token ids `[n, 1]` on the first stage, else the previous stage's hidden
        `[1, n, h]`; the output's n rows, in the pass's order (hidden `[1, n, h]` or fp32
        logits `[n, vocab]`), valid until this chunk runs again."""
        cache = self.decoder.cache
        if cache.kv is None:
            raise RuntimeError("the DecodeGraphs were released with their cache; make a new "
                               "engine to generate again")
        size = self.sizes[group]
        rows = row_bucket(slots.shape[0], size)
        keys = key_bucket(kv_len, cache.max_len, self.block)
        whole = group if rows == size and self.views[group] is not None else None
        inputs = self.inputs.get((v, rows, whole))
        if inputs is None:
            inputs = self.inputs[v, rows, whole] = _Inputs(
                self.decoder.models[v].pre_process, rows, self.hidden, self.dtype, self.device,
                cache.max_len, None if whole is None else self.views[group])
        where = inputs.load(x, slots, positions)
        run = self.runs.get((v, rows, whole, keys))
        if run is None:
            run = self.runs[v, rows, whole, keys] = self._make(v, inputs, keys)
            self.captures += 1
        out = run()
        n, dim = slots.shape[0], out.dim() - 2  # hidden [1, rows, h]; logits [rows, vocab]
        return out.narrow(dim, 0, n) if where is None else out.index_select(dim, where)

    def _make(self, v: int, inputs: _Inputs, keys: int) -> Callable[[], torch.Tensor]:
        def step():
            return self.decoder(v, inputs.x, inputs.slots, inputs.positions, inputs.lengths,
                                keys, inputs.view)
        if self.pools is None:
            return step
        if v not in self.pools:
            self.pools[v] = torch.cuda.graph_pool_handle()
        graph, output = capture(step, self.pools[v])
        self.graphs.append(graph)

        def replay():
            graph.replay()
            return output
        return replay

    def release(self) -> None:
        """Drop every graph, its pool and the static buffers (before a training step)."""
        self.runs.clear()
        self.inputs.clear()
        for graph in self.graphs:
            graph.reset()
        self.graphs = []
        if self.pools is not None:
            self.pools.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the pool's blocks go back when no graph holds them
