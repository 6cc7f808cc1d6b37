"""train.async_save on the real trainer (TP=2, two gloo processes): the save returns while the
writer process is still at work, training goes on meanwhile, and the checkpoint committed later
holds the weights of the step it was taken at (the writer's copy-on-write view), verifies, and
moves `latest` only once it is complete."""
import json
import os
import time

from tests.dist._spawn import run_distributed

BASE = ["logging=none", "model=tiny", "parallel.tp=2", "train.seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=10",
        "train.eval_samples=4", "data.num_samples=128", "train.async_save=true"]
WRITER_DELAY_S = 4.0  # the patched writer sleeps this long before writing


def _worker(rank, world_size, run_dir, out):
    import torch
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync)
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.reshard import gather_full_state
    from parallel import topology

    compat.setup()
    from megatron_ext.train import build_loop

    cfg = compose_config(BASE + [f"run.dir={run_dir}"])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    os.makedirs(run_dir, exist_ok=True)
    loop = build_loop(cfg, topo, run_dir)
    chunks, root = loop.recipe.policy.chunks, loop.checkpoints.root

    def train_step():
        loop.step += 1
        loop.recipe.train_step(loop.step)

    train_step()
    train_step()
    at_save = gather_full_state(chunks, topo)

    real_write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def slow_write(*args, **kwargs):  # runs in the forked writer
        time.sleep(WRITER_DELAY_S)
        return real_write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(slow_write)
    start = time.perf_counter()
    path = loop.save(background=True)
    blocked_s = time.perf_counter() - start
    pending = os.path.exists(path) or os.path.exists(os.path.join(root, "latest"))
    train_step()  # training goes on while the writer sleeps
    train_step()
    after = gather_full_state(chunks, topo)
    loop.checkpoints.finish()
    total_s = time.perf_counter() - start
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(real_write)

    committed = loop.checkpoints.verify(path)
    latest = open(os.path.join(root, "latest")).read().strip()
    loop.checkpoints.load(path)
    loaded = gather_full_state(chunks, topo)
    if rank == 0:
        diff_saved = max((loaded[k] - at_save[k]).abs().max().item() for k in at_save)
        diff_after = max((after[k] - at_save[k]).abs().max().item() for k in at_save)
        json.dump({"blocked_s": blocked_s, "total_s": total_s, "pending": pending,
                   "committed": committed, "latest": latest, "step": loop.step,
                   "diff_saved": diff_saved, "diff_after": diff_after},
                  open(out, "w"))


def test_async_save_returns_early_and_commits_the_saved_step(tmp_path):
    out = str(tmp_path / "out.json")
    run_distributed(_worker, 2, str(tmp_path / "run"), out)
    got = json.load(open(out))
    assert got["blocked_s"] < WRITER_DELAY_S < got["total_s"], got  # returned before the write
    assert not got["pending"], "a checkpoint was visible before its write finished"
    assert got["committed"] is None and got["latest"] == "step_00000002", got
    assert got["step"] == 2  # the train state of the saved step
    assert got["diff_after"] > 0  # the two steps after the save changed the weights ...
    assert got["diff_saved"] == 0  # ... but the checkpoint holds those of step 2
    print(f"async save: the step loop blocked {got['blocked_s']:.2f} s; the write (delayed "
          f"{WRITER_DELAY_S} s) committed after {got['total_s']:.2f} s")
