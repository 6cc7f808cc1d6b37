"""Weights of a frozen network kept in host memory and copied to the device one block (a
transformer layer, the embedding, the final norm, the output layer) at a time, for its forward:
the RL reference model then costs the device one layer's weights instead of a second full copy
of the policy (`rl.offload_reference`).

Each block's parameters hold an empty tensor between forwards; a forward pre-hook points them at
a device copy of their host tensor and a forward hook drops it again. Only for networks that run
forward-only (no autograd graph keeps the weights alive) and whose weights no longer change."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import torch


def blocks(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The parts of `module` that are streamed as one: every element of a ModuleList (a
    decoder's layers) and every other child with parameters, descending into a child only when
    it holds a ModuleList and no parameters of its own (a decoder)."""
    for child in module.children():
        yield from (b for e in child for b in _split(e)) if isinstance(
            child, torch.nn.ModuleList) else _split(child)


def _split(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    if not any(True for _ in module.parameters()):
        return
    has_list = any(isinstance(m, torch.nn.ModuleList) for m in module.modules())
    if has_list and not any(True for _ in module.parameters(recurse=False)):
        yield from blocks(module)
    else:
        yield module


class HostWeights:
    """The parameters of `chunks` (megatron modules, DDP wrappers unwrapped) moved to host
    memory (pinned for a CUDA `device`) and streamed to `device` block by block during each
    forward. `remove()` puts every weight back on the device for good."""

    def __init__(self, chunks: List[torch.nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.host: Dict[int, torch.Tensor] = {}  # id(parameter) -> its weights on the host
        self.params: Dict[int, torch.nn.Parameter] = {}
        self.resident = 0  # blocks whose weights are on the device now (the tests read it)
        self.handles = []
        pin = self.device.type == "cuda"
        for chunk in chunks:
            for block in blocks(getattr(chunk, "module", chunk)):
                params = list(block.parameters())
                for p in params:
                    if id(p) not in self.host:  # tied weights: one host copy
                        host = p.data.detach().to("cpu", copy=True)
                        self.host[id(p)] = host.pin_memory() if pin else host
                        self.params[id(p)] = p
                        p.data = self._empty(p)
                self.handles += [block.register_forward_pre_hook(self._fetcher(params)),
                                 block.register_forward_hook(self._releaser(params))]

    def _empty(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    def _fetcher(self, params) -> Callable:
        def fetch(module, args):
            for p in params:
                p.data = self.host[id(p)].to(self.device, non_blocking=True)
            self.resident += 1
        return fetch

    def _releaser(self, params) -> Callable:
        def release(module, args, output):
            for p in params:
                p.data = self._empty(p)
            self.resident -= 1
        return release

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for key, p in self.params.items():
            p.data = self.host[key].to(self.device)
        self.handles, self.host, self.params = [], {}, {}


def offload_reference(chunks: List[torch.nn.Module], device: torch.device,
                      log: Callable[[str], None]) -> Optional[HostWeights]:
    """HostWeights for `chunks` on a GPU; on the CPU, where host and device memory are the same,
    nothing is moved and `log` says so (once: the recipe calls this once per run)."""
    if torch.device(device).type == "cpu":
        log("rl.offload_reference=true: the reference model is on the CPU, where host and "
            "device memory are the same; nothing to offload, its weights stay where they are")
        return None
    return HostWeights(chunks, device)
