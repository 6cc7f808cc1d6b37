"""`python -m launch slurm`: the sbatch script it renders, what --dry-run leaves alone, and
config mistakes that stop it before sbatch. No SLURM needed: sbatch is a stub here."""
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from launch.__main__ import main
from launch.slurm import REPO

GOLDEN = Path(__file__).parent / "golden" / "sbatch_2x8.sh"
TWO_BY_EIGHT = ["cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8", "parallel.tp=2",
                "train.global_batch_size=32", "cluster.partition=gpu", "cluster.account=proj",
                "cluster.time=02:00:00", "cluster.exclusive=true", "run.name=golden",
                'cluster.env=["NCCL_DEBUG=INFO"]', 'cluster.extra_sbatch=["--mail-type=END"]']


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory and a PATH whose only sbatch is a stub that records calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch-calls\necho 4242\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _normalised(script: str, cwd: Path) -> str:
    """Machine- and time-dependent paths replaced by placeholders."""
    script = re.sub(re.escape(f"{cwd}/outputs/golden-") + r"\d{8}-\d{6}", "<RUN_DIR>", script)
    return (script.replace(sys.executable, "<PYTHON>").replace(str(cwd), "<WORKDIR>")
            .replace(str(REPO), "<REPO>"))


def test_two_nodes_by_eight_gpus_matches_the_golden_script(workdir, capsys):
    assert main(["slurm", "--dry-run", *TWO_BY_EIGHT]) == 0
    script = _normalised(capsys.readouterr().out, workdir)
    assert script == GOLDEN.read_text(), (
        f"the rendered script differs from {GOLDEN}; if the change is meant, update it:\n{script}")


def test_dry_run_submits_and_writes_nothing(workdir, capsys):
    assert main(["slurm", "--dry-run", *TWO_BY_EIGHT]) == 0
    assert "#SBATCH --nodes=2" in capsys.readouterr().out
    assert not (workdir.parent / "sbatch-calls").exists()
    assert list(workdir.iterdir()) == []


def test_submit_writes_the_script_into_the_run_dir_and_prints_the_job(workdir, capsys):
    overrides = ["cluster.nodes=1", "cluster.tasks_per_node=2", "cluster.gpus_per_node=0",
                 "run.dir=here/run", "cluster.max_requeues=5"]
    assert main(["slurm", *overrides]) == 0
    run_dir = workdir / "here" / "run"
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["job id: 4242", f"script: {run_dir}/sbatch.sh",
                       f"log: {run_dir}/slurm-4242.out (errors: slurm-4242.err)"]
    assert (workdir.parent / "sbatch-calls").read_text() == f"--parsable {run_dir}/sbatch.sh\n"
    script = (run_dir / "sbatch.sh").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=2" in script
    assert "MAX_REQUEUES=5" in script and "REQUEUE_EXIT_CODE=75" in script
    # every task and every requeue gets the same run dir: the chosen one, once, at the end
    command = script.split("srun ", 1)[1]
    assert command.count("run.dir=") == 1 and f"run.dir={run_dir} &" in command


@pytest.mark.parametrize("overrides, message", [
    (["cluster.gpus_per_node=0"],
     "cluster.tasks_per_node=0 and cluster.gpus_per_node=0 give no task per node"),
    (["cluster.env=[NCCL_DEBUG]"], "cluster.env entry 'NCCL_DEBUG' is not KEY=VALUE"),
    (["cluster.partition='a b'"], "cluster.partition='a b' contains whitespace"),
    (["cluster.nodes=0"], "cluster.nodes=0 must be >= 1"),
    (["cluster.nodes=3", "cluster.gpus_per_node=2", "parallel.tp=4"],
     "world size 6 is not divisible by parallel.tp*parallel.pp*parallel.cp"),
])
def test_config_mistakes_stop_before_sbatch(workdir, capsys, overrides, message):
    try:
        code = main(["slurm", *overrides])
    except SystemExit as exit_:  # checked_config's own exit
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (workdir.parent / "sbatch-calls").exists()


def test_without_sbatch_the_error_says_what_to_do(workdir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=1"]) == 1
    assert "sbatch is not on PATH" in capsys.readouterr().err
