"""Run a function on several gloo processes, for tests that need real process groups.

Each launch costs seconds (process start and imports), so put many checks in one function.
"""

import datetime
import os
import shutil
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes.

    ``fn`` must be importable (a module-level function). The world process group is
    initialized before and destroyed after ``fn``. A failure on any rank is re-raised here as
    ``torch.multiprocessing.ProcessRaisedException`` carrying that rank's traceback, and the
    other ranks are stopped. A collective that waits longer than ``timeout_s`` (a deadlock, or
    a rank that died) fails instead of hanging the test run. TMPDIR points at a fresh folder
    for the launch and is removed afterwards, because torch elastic and wandb leave folders
    there.
    """
    tmp = tempfile.mkdtemp(prefix="dist_test_")
    old_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tmp
    try:
        mp.spawn(
            _entry, args=(fn, world_size, _free_port(), timeout_s, args), nprocs=world_size
        )
    finally:
        if old_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmpdir
        shutil.rmtree(tmp, ignore_errors=True)
