"""A rank that dies (SIGKILL) or hangs (SIGSTOP) in the middle of a `launch local` run: every
process ends, the launcher exits non-zero and names the rank, and nothing waits longer than
parallel.timeout_s in a collective."""
import datetime
import os
import signal
import subprocess
import sys
import time

import pytest

# Steps of ~0.1 s on the tiny model: a kill lands inside forward/backward or a collective.
TINY = ["logging=none", "train.seq_len=64", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.steps=100000", "data.num_samples=512"]


def _start(nproc, run_dir, extra=()):
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--", *TINY, *extra,
           f"run.dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(proc, step):
    for line in proc.stdout:
        if line.startswith(f"step {step:>5}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-3000:]}")


def _ranks(launcher_pid):
    """{rank: pid} of the launcher's children, from their environment."""
    kids = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    ranks = {}
    for pid in map(int, kids):
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        rank = next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1]
        ranks[int(rank)] = pid
    return ranks


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def launched():
    """Processes the test started; whatever is left is killed afterwards."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigkilled_rank_ends_every_process_and_is_named(launched, tmp_path):
    proc = _start(4, tmp_path / "run")
    launched.append(proc)
    _wait_for_step(proc, 2)
    ranks = _ranks(proc.pid)
    assert sorted(ranks) == [0, 1, 2, 3]
    killed = time.monotonic()
    os.kill(ranks[2], signal.SIGKILL)
    code = proc.wait(timeout=60)
    took = time.monotonic() - killed
    stderr = proc.stderr.read()
    assert code == 128 + signal.SIGKILL, stderr[-3000:]
    assert took < 60
    assert "launch: rank 2 was killed by SIGKILL" in stderr, stderr[-3000:]
    assert not [r for r, pid in ranks.items() if _alive(pid)]
    print(f"SIGKILL of rank 2 of 4 -> launcher exit {code} after {took:.1f} s")


def test_hung_rank_fails_its_peers_after_parallel_timeout_s(launched, tmp_path):
    """A stopped (not dead) rank keeps its sockets open, so only the collective timeout ends
    the wait: parallel.timeout_s must reach megatron's groups too (the gradient all-reduce
    runs on the DP group), not only the default group."""
    timeout_s = 5
    proc = _start(2, tmp_path / "run", [f"parallel.timeout_s={timeout_s}"])
    launched.append(proc)
    _wait_for_step(proc, 2)
    ranks = _ranks(proc.pid)
    stopped = time.monotonic()
    os.kill(ranks[1], signal.SIGSTOP)
    code = proc.wait(timeout=120)
    took = time.monotonic() - stopped
    stderr = proc.stderr.read()
    assert code == 1, stderr[-3000:]
    assert "launch: rank 0 exited with code 1" in stderr
    assert "Timed out" in stderr or "timed out" in stderr, stderr[-3000:]
    # rank 0 gives up after timeout_s; the launcher then SIGKILLs the stopped rank after its
    # grace period. Megatron's old rounding would have made it at least 60 s.
    from launch.local import GRACE_S
    assert timeout_s - 1 < took < timeout_s + GRACE_S + 20, took
    assert not _alive(ranks[0]) and not _alive(ranks[1])
    print(f"SIGSTOP of rank 1 of 2 with parallel.timeout_s={timeout_s} -> launcher exit {code} "
          f"after {took:.1f} s")


def test_parallel_timeout_s_reaches_every_process_group(monkeypatch):
    """topology.initialize hands parallel.timeout_s to the default group and, exactly, to
    megatron's TP/PP/DP groups (it takes minutes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from parallel import topology

    seen = {}

    class Stop(Exception):
        pass

    def init_process_group(backend, **kw):
        seen["default"] = kw["timeout"]

    def initialize_model_parallel(**kw):
        seen["megatron"] = datetime.timedelta(minutes=kw["distributed_timeout_minutes"])
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(ps, "initialize_model_parallel", initialize_model_parallel)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # initialize() sets these when unset
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(Stop):
        topology.initialize(topology.ParallelDims(world_size=1), seed=0, timeout_s=42)
    assert seen == {"default": datetime.timedelta(seconds=42),
                    "megatron": datetime.timedelta(seconds=42)}
