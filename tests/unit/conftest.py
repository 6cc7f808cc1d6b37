"""Fixtures of the unit tests: the CPU kernel backends every kernel test runs on (the C++
extension builds on every machine (setup.py), so a missing one fails the tests instead of
skipping them), and a one-rank megatron world for the attention modules."""
import socket

import pytest
import torch.distributed as dist

from megatron_ext.ops import available_backends, set_backend

CPU_BACKENDS = ["cpp", "torch"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    if request.param not in available_backends():
        pytest.fail(f"{request.param} backend is not built (available: {available_backends()}); "
                    "rebuild with `pip install --no-build-isolation -e .` and read its WARNING")
    previous = set_backend(request.param)
    yield request.param
    set_backend(previous)


@pytest.fixture
def megatron_single_rank():
    """A one-rank gloo world with megatron's parallel state (TP = PP = CP = 1)."""
    from megatron.core import parallel_state

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
