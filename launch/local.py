"""Start N training processes on this machine with torchrun's environment contract, and end
them all when one fails."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence

ENTRY = [sys.executable, "-m", "megatron_ext.train"]
GRACE_S = 10.0  # SIGTERM -> SIGKILL when stopping the other ranks
POLL_S = 0.05  # short, so that the first rank to fail is seen before its peers fail too


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if nproc > 1:  # as torchrun: N processes with all-core thread pools would oversubscribe
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _how(code: int) -> str:
    """How a process ended, from Popen.returncode (-N: killed by signal N)."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


def _stop(procs: List[subprocess.Popen]) -> None:
    """SIGTERM the living ones, then SIGKILL what is still there after the grace period."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_local(nproc: int, overrides: Sequence[str], entry: Sequence[str] = ENTRY) -> int:
    """Run `entry overrides` in nproc processes; return 0, or the first failing exit code."""
    if nproc < 1:
        print(f"launch: --nproc {nproc} must be >= 1", file=sys.stderr)
        return 2
    port = free_port()
    procs = [subprocess.Popen([*entry, *overrides], env=rank_env(r, nproc, port))
             for r in range(nproc)]
    forwarded = {}

    def forward(signum, _frame):
        forwarded["signal"] = signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, forward)
    try:
        while True:
            codes = [p.poll() for p in procs]
            # A rank killed by a signal is the cause; peers that then fail in a collective
            # ("Connection closed by peer") exit 1 moments later: name the killed one first.
            failed = sorted(((r, c) for r, c in enumerate(codes) if c not in (None, 0)),
                            key=lambda rc: (rc[1] > 0, rc[0]))
            if failed:
                rank, code = failed[0]
                also = "".join(f"; rank {r} {_how(c)} too" for r, c in failed[1:])
                print(f"launch: rank {rank} {_how(code)}{also}; stopping the other "
                      f"{sum(c is None for c in codes)} process(es)", file=sys.stderr, flush=True)
                _stop(procs)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    finally:
        _stop(procs)
