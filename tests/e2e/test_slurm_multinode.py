"""The real trainer on the real two-node SLURM cluster (`scripts/slurm_up.sh --nodes 2`: node1
and node2, each a slurmd in its own UTS namespace, all on 127.0.0.1): a TP2 x PP2 job of
`cluster.nodes=2 cluster.tasks_per_node=2` puts ranks 0-1 on node1 and 2-3 on node2 (TP inside
a node, the PP hop across), and every step's loss, grad norm and LR, the final held-out loss and
the final weights equal, bit for bit, those of `launch local --nproc 4` with the same overrides.

- node loss: node2's slurmd and everything on it are SIGKILLed mid-run (slurm_down.sh --node);
  every rank is gone within parallel.timeout_s + 30 s, SLURM marks node2 down and requeues the
  job, and once node2 is back (slurm_up.sh --node) the job resumes from its last checkpoint.
- preemption: USR1 to the batch shell reaches the tasks on both nodes; one checkpoint is
  written by all 4 ranks, the job requeues itself and resumes from it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.e2e.slurm_fixture import REPO, slurm2_env, slurm_env  # noqa: F401  (the fixtures)
from tests.e2e.test_slurm_cluster import _ended, _job, _logs, _submit, _wait

STEPS = 12
TIMEOUT_S = 10  # parallel.timeout_s: how long a rank waits for a peer that went away
TRAIN = ["model=tiny", "logging=none", "train.seq_len=32", f"train.steps={STEPS}",
         "train.save_interval=2", "train.eval_samples=8", "parallel.tp=2", "parallel.pp=2",
         f"parallel.timeout_s={TIMEOUT_S}"]
TWO_NODES = ["cluster.nodes=2", "cluster.tasks_per_node=2", "cluster.gpus_per_node=0",
             "cluster.cpus_per_task=1", 'cluster.env=["GLOO_SOCKET_IFNAME=lo"]']
PLACEMENT = ("placement: node1 ranks 0-1 (pp stage 0), node2 ranks 2-3 (pp stage 1); "
             "tp groups inside one host each")


def _records(run_dir) -> list:
    """Every metrics record without its timings: step, loss, grad norm, LR, ...; eval too."""
    timing = ("tokens_per_s", "step_time_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _weights(checkpoint: Path, tmp_path: Path) -> dict:
    """The checkpoint's tensors (model and optimizer), gathered into one state dict."""
    out = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


def _train_steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    return sum('"split"' not in l for l in open(path)) if os.path.exists(path) else 0


def _trainers(run_dir) -> list:
    """PIDs of the trainer processes of run_dir (not srun, whose command line names them)."""
    pattern = rf"^\S*python\S* -m megatron_ext.train .*run.dir={run_dir}"
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def _node_state(env, node) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True,
                          env=env, timeout=10).stdout.strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same overrides, uninterrupted, as 4 processes on one machine: (records, run dir)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "4", "--",
                           *TRAIN, f"run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _records(run_dir), run_dir


def _check_resumed(env, job, run_dir, reference, tmp_path) -> int:
    """The requeued job completed, resumed from a checkpoint, and ended exactly where the
    uninterrupted run did; returns the step it resumed at."""
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert _job(env, job)["Restarts"] == "1", _logs(run_dir, job)
    assert out.count(PLACEMENT) == 2, out  # both runs, on both nodes
    resumed = [l for l in out.splitlines() if l.startswith("resumed from")]
    assert len(resumed) == 1, out
    step = int(resumed[0].split()[-1])
    assert resumed[0] == f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}"
    records, ref_dir = reference
    got = _records(run_dir)
    assert [r["step"] for r in got if "split" not in r] == list(range(1, STEPS + 1))
    assert got == records  # every step's loss, grad norm, LR; the held-out loss at the end
    final = f"step_{STEPS:08d}"
    mine, theirs = (_weights(d / "checkpoints" / final, tmp_path) for d in (run_dir, ref_dir))
    assert mine.keys() == theirs.keys() and len(mine) > 10
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # bit for bit
    return step


def test_node_loss_requeues_and_resumes_bit_exact(slurm2_env, tmp_path, reference):
    env, run_dir = slurm2_env, tmp_path / "run"
    scripts = REPO / "scripts"
    job = _submit(env, [*TWO_NODES, *TRAIN, "cluster.max_requeues=0"], run_dir)
    node2_lost = False
    try:
        _wait(lambda: _train_steps(run_dir) >= 4, 180, "4 logged steps", step_s=0.2)
        assert _trainers(run_dir)
        node2_lost = True
        subprocess.run(["bash", str(scripts / "slurm_down.sh"), "--node", "node2"], env=env,
                       check=True, timeout=30)
        lost = time.monotonic()
        before = _train_steps(run_dir)
        assert before < STEPS, "the run ended before the node loss; give it more steps"
        _wait(lambda: not _trainers(run_dir), TIMEOUT_S + 30, "every rank to exit", step_s=0.2)
        ranks_gone = time.monotonic() - lost
        _wait(lambda: _node_state(env, "node2").startswith("down")
              and _job(env, job).get("Restarts") == "1", 120, "node2 down and the job requeued")
        requeued = time.monotonic() - lost
        assert _job(env, job)["JobState"] == "PENDING"  # it needs both nodes
        subprocess.run(["bash", str(scripts / "slurm_up.sh"), "--node", "node2"], env=env,
                       check=True, timeout=60)
        node2_lost, back = False, time.monotonic()
        state = _wait(lambda: _ended(env, job), 180, "the requeued job to end")
        assert state == "COMPLETED", _logs(run_dir, job)
        done = time.monotonic() - back
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)
        if node2_lost:  # the test failed before it brought node2 back
            subprocess.run(["bash", str(scripts / "slurm_up.sh"), "--node", "node2"], env=env,
                           timeout=60)
    step = _check_resumed(env, job, run_dir, reference, tmp_path)
    assert 0 < step <= before
    print(f"node2 lost after {before} logged steps: every rank gone after {ranks_gone:.1f} s, "
          f"node down and job requeued after {requeued:.1f} s; node back -> resumed at step "
          f"{step} and completed in {done:.1f} s; bit-exact")


def test_usr1_on_two_nodes_saves_once_on_all_ranks_and_resumes(slurm2_env, tmp_path, reference):
    env, run_dir = slurm2_env, tmp_path / "run"
    job = _submit(env, [*TWO_NODES, *TRAIN, "cluster.max_requeues=1",
                        "train.save_interval=1000"], run_dir)
    try:
        _wait(lambda: _train_steps(run_dir) >= 3, 180, "3 logged steps", step_s=0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True,
                       timeout=30)
        signalled = time.monotonic()
        state = _wait(lambda: _ended(env, job), 240, "the requeued job to end")
        took = time.monotonic() - signalled
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)
    assert state == "COMPLETED", _logs(run_dir, job)
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert "launch: the trainer asked to go on; requeue 1 of 1" in out
    stopped = [l for l in out.splitlines() if l.startswith("stopping at step")]
    assert len(stopped) == 1 and "SIGUSR1: exiting for requeue" in stopped[0], out
    step = int(stopped[0].split()[3])
    # save_interval=1000: the preemption checkpoint and the final one are the only ones
    assert sorted(os.listdir(run_dir / "checkpoints")) == sorted(
        [f"step_{step:08d}", f"step_{STEPS:08d}", "latest"])
    files = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "manifest.json")
                       .read_text())["files"]
    assert {f.split("_")[2] for f in files if f.endswith(".distcp")} == {"0", "1", "2", "3"}
    assert {f for f in files if f.startswith("rank_state/")} == {
        f"rank_state/{r:05d}.pt" for r in range(4)}  # every rank of both nodes wrote
    assert _check_resumed(env, job, run_dir, reference, tmp_path) == step
    print(f"USR1 on 2 nodes: saved at step {step} by all 4 ranks, requeued, resumed, "
          f"{STEPS} steps bit-exact; signal to completion {took:.1f} s")
