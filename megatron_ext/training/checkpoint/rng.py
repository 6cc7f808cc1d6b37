"""Every RNG stream of one rank (torch CPU, CUDA, megatron's model-parallel tracker): saved per
rank, so a resume on the same layout continues each rank's streams exactly."""
from __future__ import annotations

from typing import Dict

import torch


def rng_state() -> Dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracker_state
    return state


def set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
