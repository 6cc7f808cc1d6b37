"""torch.cuda.CUDAGraph's contract on a CPU, for the tests of models/decode_graph.py: `capture`
records the callable and leaves its static output unset (NaN), every replay reruns it and
writes the result into that same output tensor, and reset() drops it. The outputs of all
graphs of one memory pool share its memory (the worst a shared pool may do: one graph's
intermediates where another's output lies), so any replay in a pool clobbers the outputs of
the others. An engine that read an output before its replay, kept one past another replay of
its pool, or fed a graph anything but its static buffers would get other numbers here, as on
a GPU."""
from __future__ import annotations

import torch

from megatron_ext.models import decode_graph


class FakeGraph:
    def __init__(self, fn, output):
        self.fn, self.output, self.replays, self.released = fn, output, 0, False

    def replay(self):
        assert not self.released, "replay of a released graph"
        self.output.copy_(self.fn())
        self.replays += 1

    def reset(self):
        self.fn, self.released = None, True


def fake_capture(fn, pool, warmup: int = 3):
    assert isinstance(pool, Pool), pool
    for _ in range(warmup):
        fn()
    out = fn()
    size = out.numel() * out.element_size()
    assert size <= len(pool.memory), "a larger pool for these tests"
    output = pool.memory[:size].view(out.dtype).view(out.shape)
    output.fill_(float("nan"))
    graph = FakeGraph(fn, output)
    GRAPHS.append(graph)
    return graph, graph.output


GRAPHS = []


class Pool:
    """A stand-in for torch.cuda.graph_pool_handle()'s handle: memory every output of its
    graphs lies in."""

    def __init__(self):
        self.memory = torch.empty(1 << 22, dtype=torch.uint8)


def install(setattr) -> list:
    """Serve DecodeGraphs(graphs=True) from FakeGraph on a CPU model, through `setattr`
    (pytest's monkeypatch.setattr, or the builtin in a spawned worker); the graphs made."""
    GRAPHS.clear()
    setattr(decode_graph, "capture", fake_capture)
    setattr(decode_graph, "unsupported", lambda chunks: None)
    setattr(torch.cuda, "graph_pool_handle", Pool)
    return GRAPHS
