"""PreemptionFlag: USR1/TERM set a flag instead of ending the process, and the ranks agree."""
import os
import signal

import pytest
import torch.distributed as dist

from megatron_ext.config.load import REQUEUE_EXIT_CODE
from megatron_ext.training.preemption import PreemptionFlag


def test_exit_code_is_ex_tempfail():
    assert REQUEUE_EXIT_CODE == 75


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_the_process_lives(signum, capsys):
    with PreemptionFlag() as flag:
        assert not flag.requested()
        os.kill(os.getpid(), signum)
        assert flag.requested() and flag.signum == signum
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal keeps the first
        assert flag.signum == signum
    assert f"got {signal.Signals(signum).name}" in capsys.readouterr().out


def test_uninstall_restores_the_previous_handlers():
    before = {s: signal.getsignal(s) for s in PreemptionFlag.SIGNALS}
    flag = PreemptionFlag().install()
    assert all(signal.getsignal(s) == flag._handle for s in PreemptionFlag.SIGNALS)
    flag.uninstall()
    assert {s: signal.getsignal(s) for s in PreemptionFlag.SIGNALS} == before


def test_requested_anywhere_reduces_over_the_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        flag = PreemptionFlag()
        group = dist.group.WORLD
        assert flag.requested_anywhere(group) is False
        flag.signum = signal.SIGUSR1
        assert flag.requested_anywhere(group) is True
    finally:
        dist.destroy_process_group()
