"""env_world: torchrun's variables win, then an srun step's, then one process."""
import pytest

from parallel.topology import env_world

VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
        "SLURM_STEP_ID")
SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
              "SLURM_STEP_ID": "0"}


@pytest.fixture
def env(monkeypatch):
    """Start from no launcher variables (the tests may themselves run inside a SLURM job)."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)

    def set_vars(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)
    return set_vars


def test_no_launcher_is_one_process(env):
    assert env_world() == (0, 0, 1)


def test_srun_step_gives_rank_local_rank_and_world(env):
    env(**SLURM_STEP)
    assert env_world() == (5, 1, 8)


def test_torchrun_wins_over_slurm(env):
    """torchrun inside a SLURM task: every worker sees the task's SLURM_PROCID."""
    env(**SLURM_STEP, RANK="3", LOCAL_RANK="2", WORLD_SIZE="16")
    assert env_world() == (3, 2, 16)


def test_local_rank_defaults_to_rank(env):
    env(RANK="2", WORLD_SIZE="4")
    assert env_world() == (2, 2, 4)


def test_batch_shell_is_one_process(env):
    """The batch shell carries SLURM_PROCID=0 and the allocation's task count, but no step."""
    env(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="16")
    assert env_world() == (0, 0, 1)
