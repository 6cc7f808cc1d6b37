"""The local launcher: torchrun's environment, and a failing rank ends the whole run."""
import subprocess
import sys
import time

from launch.local import run_local

SLEEPER = """
import os, sys, time
rank = int(os.environ["RANK"])
assert os.environ["WORLD_SIZE"] == "3" and os.environ["MASTER_ADDR"] == "127.0.0.1"
if rank == 1:
    time.sleep(1)
    sys.exit(7)
time.sleep(300)
"""


def test_failing_rank_stops_the_others_quickly():
    start = time.monotonic()
    code = run_local(3, [], entry=[sys.executable, "-c", SLEEPER])
    assert code == 7
    assert time.monotonic() - start < 60


def test_all_ranks_succeed():
    assert run_local(2, [], entry=[sys.executable, "-c", "import os; assert os.environ['RANK'] in '01'"]) == 0


def test_bad_data_file_ends_the_run_with_a_named_error(tmp_path):
    """A mistake inside the data shows only once the ranks read it (a missing file is a config
    error the launcher reports before starting any: tests/e2e/test_bad_inputs.py)."""
    (tmp_path / "broken.jsonl").write_text("{broken\n")
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "local", "--nproc", "2", "--", "logging=none",
         "data=jsonl", f"data.path={tmp_path}/broken.jsonl", f"run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert f"{tmp_path}/broken.jsonl:1: malformed line" in proc.stderr
    assert "launch: rank" in proc.stderr


def test_single_process_runs_need_no_port(tmp_path):
    """Without MASTER_PORT a one-process run rendezvous in-process: two such runs on one
    machine (here: one while port 29500, the default, is taken) do not collide."""
    import os
    import socket

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by someone else: the run must still start
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_ext.train", "model=tiny", "logging=none",
             "train.steps=1", "train.seq_len=32", "train.micro_batch_size=2",
             "train.global_batch_size=2", "train.eval_samples=2", "train.save_interval=0",
             f"run.dir={tmp_path}/run"],
            capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(f"{tmp_path}/run/metrics.jsonl")
