"""torch.cuda.CUDAGraph's contract on a CPU, for the tests of models/decode_graph.py: `capture`
records the callable and leaves its static output unset (NaN), every replay reruns it and
writes the result into that same output tensor, and reset() drops it. An engine that read an
output before its replay, kept one past the next replay of its bucket, or fed a graph
anything but its static buffers would get other numbers here, as on a GPU."""
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


def fake_capture(fn, pool, warmup: int = 2):
    assert pool == "pool", "every graph shares the DecodeGraphs' pool"
    for _ in range(warmup):
        fn()
    graph = FakeGraph(fn, torch.full_like(fn(), float("nan")))
    GRAPHS.append(graph)
    return graph, graph.output


GRAPHS = []


def install(setattr) -> list:
    """Serve DecodeGraphs(graphs=True) from FakeGraph on a CPU model, through `setattr`
    (pytest's monkeypatch.setattr, or the builtin in a spawned worker); the graphs made."""
    GRAPHS.clear()
    setattr(decode_graph, "capture", fake_capture)
    setattr(decode_graph, "unsupported", lambda chunks: None)
    setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    return GRAPHS
