"""Preemption: SLURM warns a job before it ends it, and the trainer answers by finishing the
step, saving a checkpoint and exiting with config.load.REQUEUE_EXIT_CODE, which the sbatch
script turns into `scontrol requeue`.

The warning is SIGUSR1 (`--signal=B:USR1@<cluster.signal_seconds>`, forwarded by the batch
shell to every task) or SIGTERM (scancel, a node drain, the local launcher stopping a run). A
handler only sets a flag: the step in flight must finish so that the checkpoint is consistent.
"""
from __future__ import annotations

import signal
from typing import Optional

from megatron_ext.training import collectives


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM once installed; polled by the trainer between steps.

    Ranks get the signal at different moments, so act on `requested_anywhere(group)` (the same
    answer on every rank), never on `requested()` alone: one rank leaving early hangs the rest.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> "PreemptionFlag":
        """Take over the signals (main thread only, as Python requires)."""
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before install()."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"preemption: got {signal.Signals(signum).name}; stopping after this step",
                  flush=True)

    def requested(self) -> bool:
        return self.signum is not None

    def signal_anywhere(self, group) -> int:
        """The highest signal number any rank of `group` got (SIGTERM 15 outranks SIGUSR1 10),
        0 when none: a MAX all-reduce, so every rank must call it at the same point of the
        loop, and all ranks then take the same exit."""
        return int(collectives.reduce_floats([self.signum or 0], group, "max")[0])

    def requested_anywhere(self, group) -> bool:
        return self.signal_anywhere(group) != 0

    def __enter__(self) -> "PreemptionFlag":
        return self.install()

    def __exit__(self, *_exc) -> None:
        self.uninstall()
