"""Requeue with the real trainer on the real one-node SLURM cluster: a 2-task job is stopped in
the middle of training, requeued, resumes from its checkpoint in the same run directory and
completes; its metrics have every step once and are bit-identical to an uninterrupted
`launch local --nproc 2` run of the same overrides (both are DP2 on gloo).

- USR1 (SLURM's warning before the time limit; sent here as `scancel --signal=USR1 --batch`):
  the batch shell forwards it, the trainer saves and exits 75, the shell requeues the job.
- `scontrol requeue` (SLURM requeues the job itself): every process gets SIGTERM, the trainer
  saves and exits 143 within KillWait, and SLURM starts the job again."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.slurm_fixture import REPO, slurm_env  # noqa: F401  (the fixture)
from tests.e2e.test_slurm_cluster import _ended, _job, _logs, _submit, _wait

STEPS = 24
TRAIN = ["model=tiny", "logging=none", "train.seq_len=64", "train.micro_batch_size=2",
         "train.global_batch_size=8", f"train.steps={STEPS}", "train.save_interval=2",
         "train.eval_samples=8", "data.num_samples=512"]
TWO_TASKS = ["cluster.nodes=1", "cluster.tasks_per_node=2", "cluster.gpus_per_node=0",
             "cluster.cpus_per_task=1"]  # one thread per task, as `launch local` sets it


def _metrics(run_dir):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if "split" not in r]


def _train_records(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return sum(1 for l in open(path) if l.strip() and '"split"' not in l)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same overrides, uninterrupted, with the local launcher."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    proc = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "2", "--",
                           *TRAIN, f"run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(run_dir)


def _interrupted_job(env, run_dir, stop, max_requeues, after):
    """Submit, call stop(job) once training has logged `after` steps, wait for the requeued
    job to complete; returns (job id, final state, its log, the steps logged before the stop).
    The first checkpoint (step 2) starts megatron's helper processes: stopping after it checks
    that SLURM's signal, which reaches every process of the step, does not kill them."""
    job = _submit(env, [*TWO_TASKS, *TRAIN, f"cluster.max_requeues={max_requeues}"], run_dir)
    try:
        _wait(lambda: _train_records(run_dir) >= after, 180, f"{after} logged steps",
              step_s=0.2)
        before = _train_records(run_dir)
        assert before < STEPS, "the run ended before the stop; give it more steps"
        stop(job)
        state = _wait(lambda: _ended(env, job), 240, "the requeued job to end")
        return job, state, _logs(Path(run_dir), job), before
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)


def _check_resumed_run(env, job, state, run_dir, log, reference):
    out = open(os.path.join(run_dir, f"slurm-{job}.out")).read()
    assert state == "COMPLETED", log
    assert _job(env, job)["Restarts"] == "1"
    assert "launch: job %s (restart 0)" % job in out and "launch: job %s (restart 1)" % job in out
    stopped = next((l for l in out.splitlines() if l.startswith("stopping at step")), None)
    first = out[:out.index("launch: job %s (restart 1)" % job)]
    err = open(os.path.join(run_dir, f"slurm-{job}.err")).read()
    assert stopped, ("the first run never said it stopped; its log:\n" + first[-3000:] +
                     "\nstderr:\n" + "\n".join(l for l in err.splitlines() if "Warning" not in l
                                                and "warnings.warn" not in l)[-6000:])
    step = int(stopped.split()[3])
    assert f"saved checkpoint {run_dir}/checkpoints/step_{step:08d}" in out
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}" in out
    got = _metrics(run_dir)
    assert [g[0] for g in got] == list(range(1, STEPS + 1))  # no gap, no repeat
    assert got[-1][1] == reference[-1][1]  # the final loss, bit for bit
    assert got == reference  # and every step's loss, grad norm and lr
    return stopped, step


def test_usr1_requeues_and_resumes_bit_exact(slurm_env, tmp_path, reference):
    run_dir = str(tmp_path / "run")

    def usr1(job):  # what SLURM sends signal_seconds before the time limit
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True,
                       timeout=30)

    job, state, log, before = _interrupted_job(slurm_env, run_dir, usr1, max_requeues=1, after=5)
    stopped, step = _check_resumed_run(slurm_env, job, state, run_dir, log, reference)
    assert "SIGUSR1: exiting for requeue" in stopped
    assert "launch: the trainer asked to go on; requeue 1 of 1" in open(
        os.path.join(run_dir, f"slurm-{job}.out")).read()
    print(f"USR1 after {before} logged steps: stopped and saved at step {step}, resumed, "
          f"{STEPS} steps bit-exact")


def test_scontrol_requeue_saves_on_sigterm_and_resumes_bit_exact(slurm_env, tmp_path,
                                                                  reference):
    run_dir = str(tmp_path / "run")

    def requeue(job):  # SLURM requeues it itself (preemption, an admin): SIGTERM to all
        subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, timeout=30)

    job, state, log, before = _interrupted_job(slurm_env, run_dir, requeue, max_requeues=0, after=3)
    stopped, step = _check_resumed_run(slurm_env, job, state, run_dir, log, reference)
    assert stopped.rstrip().endswith("on SIGTERM")
    print(f"scontrol requeue after {before} logged steps: stopped and saved at step {step}, "
          f"resumed, {STEPS} steps bit-exact")


def test_checkpoint_helpers_survive_the_signals_slurm_sends_to_every_process():
    """SLURM signals every process of a job step, not only the tasks. megatron's save spawns a
    multiprocessing Manager (kept for the run) that would die of USR1/SIGTERM, and with it
    the checkpoint the signal asked for (EOFError in the save). Started inside
    the checkpoint manager's shield, it inherits a mask that blocks both signals."""
    import multiprocessing as mp
    import signal
    import time

    from megatron_ext.training.checkpoint.manager import _children_shielded

    managers = {}
    for shielded in (False, True):
        if shielded:
            with _children_shielded():
                managers[shielded] = mp.get_context("spawn").Manager()
        else:
            managers[shielded] = mp.get_context("spawn").Manager()
    for manager in managers.values():
        os.kill(manager._process.pid, signal.SIGUSR1)
        os.kill(manager._process.pid, signal.SIGTERM)
    time.sleep(1.0)
    try:
        assert not managers[False]._process.is_alive()  # what happened before the shield
        queue = managers[True].Queue()
        queue.put("still here")
        assert queue.get() == "still here"
    finally:
        for manager in managers.values():
            if manager._process.is_alive():
                manager._process.kill()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()  # the trainer's mask back
