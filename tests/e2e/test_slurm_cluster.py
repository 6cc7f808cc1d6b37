"""`python -m launch slurm` on a real (one-node) SLURM cluster: a 2-task job trains and leaves
its run directory; scancel ends every task; USR1 -> exit 75 -> requeue, up to
cluster.max_requeues. Job ids restart at 1 on each cold start, so every job writes into its own
fresh folder."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.slurm_fixture import REPO, slurm_env  # noqa: F401  (the fixture)

TWO_TASKS = ["cluster.nodes=1", "cluster.tasks_per_node=2", "cluster.gpus_per_node=0"]
TINY = ["model=tiny", "train.seq_len=32"]

# Stands in for `python -m megatron_ext.train` (via --python): records what env_world derives
# from srun's variables, then exits with the requeue code when USR1 arrives.
FAKE_TRAINER = """
import os, signal, sys, time
from parallel.topology import env_world
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
rank, local_rank, world = env_world()
run_dir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("run.dir=")][0]
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
with open(os.path.join(run_dir, f"start-{restart}-{rank}"), "w") as f:
    f.write(f"{rank} {local_rank} {world} {os.environ['MASTER_PORT']}")
time.sleep(300)
"""


def _submit(env, overrides, run_dir, *launch_args):
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "slurm", *launch_args, *overrides, f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=120, env=dict(env, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"^job id: (\d+)$", proc.stdout, re.M).group(1)
    assert f"log: {run_dir}/slurm-{job}.out" in proc.stdout
    return job


def _job(env, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         env=env, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(what, timeout_s, waiting_for, step_s=1.0):
    """Poll what() until it returns something truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(step_s)
    raise AssertionError(f"still waiting after {timeout_s} s for {waiting_for}")


def _ended(env, job) -> str:
    state = _job(env, job).get("JobState", "")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else ""


def _logs(run_dir: Path, job: str) -> str:
    return "".join((run_dir / f"slurm-{job}.{ext}").read_text()[-3000:] for ext in ("out", "err")
                   if (run_dir / f"slurm-{job}.{ext}").exists())


def test_two_task_job_trains_and_fills_the_run_dir(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, [*TWO_TASKS, *TINY, "train.steps=10"], run_dir)
    state = _wait(lambda: _ended(slurm_env, job), 240, "the job to end")
    assert state == "COMPLETED", _logs(run_dir, job)
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "2 tasks, rendezvous" in out and "layout: world 2 " in out
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") != "eval"] == list(range(1, 11))
    runs = [d for d in os.listdir(run_dir / "wandb" / "wandb") if d.startswith("offline-run")]
    assert len(runs) == 1


def test_scancel_ends_every_task(slurm_env, tmp_path):
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, [*TWO_TASKS, *TINY, "train.steps=100000", "logging=none"], run_dir)

    def training():
        return (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size

    _wait(training, 180, "the first metrics record")
    subprocess.run(["scancel", job], env=slurm_env, check=True, timeout=30)
    cancelled = time.monotonic()

    def gone():
        left = subprocess.run(["pgrep", "-f", f"megatron_ext.train .*run.dir={run_dir}"],
                              capture_output=True, text=True).stdout.split()
        return not left and _ended(slurm_env, job)

    assert _wait(gone, 60, "the job and its tasks to end", step_s=0.5) == "CANCELLED"
    assert time.monotonic() - cancelled < 60


def test_usr1_requeues_until_max_requeues(slurm_env, tmp_path):
    """The batch shell forwards USR1 to the tasks; their exit 75 requeues the job once
    (cluster.max_requeues=1), and the second time the job fails with 75."""
    fake = tmp_path / "fake_python"
    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path}/fake_trainer.py \"$@\"\n")
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    job = _submit(slurm_env, [*TWO_TASKS, "cluster.max_requeues=1"], run_dir,
                  "--python", str(fake))
    port = str(20000 + int(job) % 20000)
    for restart in (0, 1):
        def started(restart=restart):
            return all((run_dir / f"start-{restart}-{r}").exists() for r in (0, 1))

        _wait(started, 120, f"both tasks of run {restart} to start")
        for rank in (0, 1):  # env_world under srun: rank, local rank, world; the job's port
            assert (run_dir / f"start-{restart}-{rank}").read_text() == f"{rank} {rank} 2 {port}"
        # what SLURM does signal_seconds before the time limit: USR1 to the batch shell only
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env,
                       check=True, timeout=30)
    assert _wait(lambda: _ended(slurm_env, job), 60, "the job to end") == "FAILED", \
        _logs(run_dir, job)
    info = _job(slurm_env, job)
    assert (info["Restarts"], info["ExitCode"]) == ("1", "75:0")
    logs = _logs(run_dir, job)
    assert "requeue 1 of 1" in logs and "not requeued: job" in logs
