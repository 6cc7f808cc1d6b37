"""Bridge megatron-core's CUDA assumptions onto a CPU torch, so its models, DDP, optimizer and
pipeline schedules run on gloo. Installed once by `install()` when CUDA is absent; nothing else
in the project patches megatron-core. Each bridge names the megatron-core version (0.16.1) and
the place that needed it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_INSTALLED = False
_CPU = torch.device("cpu")


class _FakeEvent:
    """torch.cuda.Event stand-in: timers and schedules record and wait on events."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _FakeStream(_FakeEvent):
    """torch.cuda.Stream stand-in: DDP makes a communication stream (distributed_data_parallel.py)."""

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass


def _cpu_device_kwargs(kwargs):
    device = kwargs.get("device")
    if device is not None and torch.device(device).type == "cuda":
        kwargs["device"] = _CPU
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_cpu_device_kwargs(kwargs))

    return wrapper


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "triu", "tril")


class _CpuTorch(types.ModuleType):
    """A view of `torch` whose factory functions turn device="cuda" and pin_memory=True into CPU
    allocations. It replaces the module-level name `torch` only in the megatron modules that
    spell the device as a literal, so no global torch function is wrapped."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules with literal device="cuda" / pin_memory=True on the code paths we run (0.16.1).
_LITERAL_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens in every schedule
    "megatron.core.optimizer.clip_grads",  # grad-norm buffers
    "megatron.core.optimizer.optimizer",  # FP32Optimizer._scale, found_inf
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.transformer.utils",  # get_default_causal_mask
    "megatron.core.utils",  # local_multi_tensor_l2_norm
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.models.common.embeddings.rope_utils",  # pin_memory in CP RoPE
)


@contextlib.contextmanager
def _cuda_type_names():
    """Make `tensor.type()` report CPU tensors under their CUDA names, for the optimizer's
    dtype dispatch that compares against 'torch.cuda.FloatTensor' (clip_grads.py,
    optimizer.py, distrib_optimizer.py in 0.16.1)."""
    original = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and not self.is_cuda:
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_named_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Event = _FakeEvent
    cuda.Stream = _FakeStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.current_stream = lambda *a, **k: _FakeStream()
    cuda.default_stream = lambda *a, **k: _FakeStream()
    # torch.manual_seed calls cuda.manual_seed_all: keep that one a no-op so it cannot recurse.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    # A CPU-only torch cannot move anything to CUDA; megatron calls .cuda() on tensors it
    # already placed (language_module.py tied embeddings, optimizer.py reload).
    torch.Tensor.cuda = lambda self, *a, **k: self


def _patch_megatron():
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mp_optimizer
    from megatron.core.tensor_parallel import random as mp_random

    cpu_torch = _CpuTorch()
    for name in _LITERAL_CUDA_MODULES:
        importlib.import_module(name).torch = cpu_torch

    # The CUDA RNG tracker (model_parallel_cuda_manual_seed, get_cuda_rng_tracker().fork())
    # keeps its states on the CPU generator: random.py reads torch.cuda.default_generators.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    clipped = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipped
    mp_optimizer.clip_grad_by_total_norm_fp32 = clipped  # imported by name there
    dist_opt = distrib_optimizer.DistributedOptimizer
    build = dist_opt.__dict__["_build_model_and_main_param_groups"].__func__  # a classmethod
    dist_opt._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build))


def install() -> bool:
    """Install the bridges once; returns True when they are active (CUDA absent)."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_megatron()
        _INSTALLED = True
    return True
