"""CheckpointManager: one dist_checkpointing save of every sharded part (model, optimizer, a
second model such as the PPO critic, ...), beside what megatron does not keep: the JSON state of
every stateful (step, LR schedule, data position, guards), the model shape, the parallel layout
and the RNG streams of every rank.

A checkpoint is written into `.tmp-<name>`, hashed into `manifest.json` (integrity.py), renamed
to `<name>` and only then does `latest` point at it; `keep` step checkpoints are kept. On resume
the newest checkpoint that verifies is used; a partial or corrupt one is named and skipped. Any
TP/PP/DP layout loads any other, padded vocab included; the RNG streams then restart from the
seed."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_ext.compat.ckpt_writer import route_write_results
from megatron_ext.training.checkpoint import integrity
from megatron_ext.training.checkpoint.errors import CheckpointError
from megatron_ext.training.checkpoint.parts import PADDED_VOCAB, zero_vocab_padding
from megatron_ext.training.checkpoint.rng import rng_state, set_rng_state
from megatron_ext.training.collectives import broadcast_object
from parallel.topology import Topology

_STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAIN_STATE = "train_state.json"
_RESERVED = ("step", "shape", "layout")  # train_state.json keys beside the states


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of committed step_N folders, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n))
             for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return sorted(found, reverse=True)


def read_train_state(path: str) -> Dict:
    with open(os.path.join(path, TRAIN_STATE)) as f:
        return json.load(f)


@contextlib.contextmanager
def _children_shielded():
    """Block SIGUSR1 and SIGTERM in this thread while dist_checkpointing saves.

    megatron starts helper processes there: a multiprocessing Manager (spawned, at the first
    save, and kept for the rest of the run) and forked writers. SLURM delivers USR1 and SIGTERM
    to every process of a job step, and a spawned process dies of them (default action): the
    save that the signal asked for then failed with EOFError or ConnectionRefusedError. Helpers
    started under this mask inherit it and so ignore the signals for good; in the trainer they
    only stay pending for the duration of the save and then reach its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _layout(topo: Topology) -> Dict:
    """The parallel layout a checkpoint was written under; a change means resharding."""
    d = topo.dims
    return {"world_size": d.world_size, "tp": d.tp, "pp": d.pp, "cp": d.cp, "vpp": d.vpp,
            "dp": d.dp}


class CheckpointManager:
    """Saves and loads the named `sharded` parts (parts.py) and `states` (objects with JSON-able
    state_dict()/load_state_dict()) under `root`. Every method is called on every rank.

    `shape` is what a checkpoint must match to load (parts.model_shape); `log(message)` reports
    (the caller prints on one rank); with `async_save` a step save can be written in the
    background (megatron's AsyncCallsQueue, one save in flight)."""

    def __init__(self, root: str, topo: Topology, *, keep: int, sharded: Dict, states: Dict,
                 shape: Dict, log: Callable[[str], None], async_save: bool = False):
        clash = [name for name in states if name in _RESERVED]
        if clash:
            raise ValueError(f"state names {clash} are reserved in {TRAIN_STATE} "
                             f"({', '.join(_RESERVED)}); give the states other names")
        self.root, self.topo, self.keep = root, topo, keep
        self.sharded, self.states, self.shape, self.log = dict(sharded), dict(states), shape, log
        self.last_saved_step: Optional[int] = None  # of the last untagged save (or the load)
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            self._queue = AsyncCallsQueue()
        self._strategy = None

    # -- save -----------------------------------------------------------------------------
    def _save_strategy(self):
        """megatron's default writer, with the writes of replicated tensors spread over the
        DP x CP ranks (megatron's fully parallel save), so every rank writes (and hashes) a
        share instead of DP rank 0 writing every replica's tensors."""
        if self._strategy is None:
            from megatron.core.dist_checkpointing.serialization import (
                get_default_save_sharded_strategy)
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper)
            self._strategy = FullyParallelSaveStrategyWrapper(
                get_default_save_sharded_strategy(), self.topo.dp_cp_group)
        return self._strategy

    def save(self, step: int, tag: Optional[str] = None, background: bool = False) -> str:
        """Write a checkpoint of step `step`; returns its final path. With `tag` (e.g.
        "bad-state", "best") it is written as `<tag>_<step>` beside the regular ones, always
        before this returns, and `latest` does not move.

        With `background` (and async_save) the sharded tensors are written by a forked process,
        whose copy-on-write view of memory is the state at this step, and the call returns once
        the small files are written; the commit runs at a later `finish` on every rank."""
        from megatron.core import dist_checkpointing
        self.finish()  # one save in flight
        background = background and tag is None and self._queue is not None
        rank = self.topo.rank
        name = step_dir_name(step) if tag is None else f"{tag}_{step:08d}"
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, f".tmp-{name}")
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier(group=dist.group.WORLD)
        sharded = {n: part.sharded_state_dict(is_loading=False) for n, part in self.sharded.items()}
        route_write_results(background)
        with _children_shielded():
            request = dist_checkpointing.save(sharded, tmp, sharded_strategy=self._save_strategy(),
                                              async_sharded_save=background)
        os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rank_state", f"{rank:05d}.pt"))
        if rank == 0:
            state = {n: s.state_dict() for n, s in self.states.items()}
            state.update(step=step, shape=self.shape, layout=_layout(self.topo))
            integrity.atomic_write(os.path.join(tmp, TRAIN_STATE), json.dumps(state, indent=1))
        if tag is None:
            self.last_saved_step = step

        def commit() -> None:
            self._commit(tmp, final, name, is_step=tag is None)
            self.log(f"saved checkpoint {final}")

        if not background:
            commit()
            return final
        request.add_finalize_fn(commit)  # after megatron's own (its metadata, a barrier)
        with _children_shielded():  # the writer process ignores SLURM's signals
            self._queue.schedule_async_request(request)
        self.log(f"saving checkpoint {final} in the background")
        return final

    def _commit(self, tmp: str, final: str, name: str, is_step: bool) -> None:
        """Every rank's files are in `tmp`: manifest (hashed by the ranks that wrote them),
        rename, then `latest` and retention."""
        dist.barrier(group=dist.group.WORLD)
        integrity.commit_manifest(tmp)
        if self.topo.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            integrity.fsync_dir(self.root)
            if is_step:
                integrity.atomic_write(os.path.join(self.root, "latest"), name + "\n")
                integrity.fsync_dir(self.root)
                for _, old in list_checkpoints(self.root)[max(self.keep, 1):]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier(group=dist.group.WORLD)

    def finish(self, wait: bool = True) -> None:
        """Commit the background saves that are done (all of them, waiting, with `wait`)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=wait)

    # -- choose -----------------------------------------------------------------------------
    def verify(self, path: str) -> Optional[str]:
        """None when `path` is a complete, intact checkpoint, else what is wrong with it; the
        files are checked in shares over the ranks and all get the same verdict."""
        return integrity.verify_shared(path)

    def resume_path(self, mode: str) -> Optional[str]:
        """What train.resume=`mode` resumes from: auto (the newest checkpoint under root that
        verifies; each bad one is reported and skipped), none, or a checkpoint PATH. None when
        there is nothing to resume; CheckpointError when nothing usable is where one was asked
        for."""
        if mode == "none":
            return None
        hint = "; give a complete checkpoint as train.resume=PATH, or train.resume=none to start over"
        if mode != "auto":
            problem = self.verify(mode)
            if problem is not None:
                raise CheckpointError(f"train.resume={mode!r} is unusable: {problem}{hint}")
            return mode
        found = broadcast_object([p for _, p in list_checkpoints(self.root)], group=dist.group.WORLD)
        for path in found:
            problem = self.verify(path)
            if problem is None:
                return path
            self.log(f"checkpoint {path} is unusable: {problem}; trying the previous one")
        if found:
            raise CheckpointError(f"train.resume=auto found checkpoints in {self.root} but none "
                                  f"is usable (see above){hint}")
        return None

    # -- load -------------------------------------------------------------------------------
    def _check_shape(self, path: str, saved: Dict, hint: str) -> None:
        diff = {k: (saved.get(k), v) for k, v in self.shape.items()
                if k != PADDED_VOCAB and saved.get(k) != v}
        if diff:
            raise CheckpointError(f"checkpoint {path} is from another model shape: (checkpoint, "
                                  f"config) = {diff}; {hint}")

    def load(self, path: str, only: Optional[Sequence[str]] = None,
             parts: Optional[Dict] = None) -> Dict:
        """Restore the sharded parts named in `only` (default: all) from `path`, in any layout;
        with `only` None also every state and, on the same layout, the RNG streams. `parts`
        gives other receivers by name (e.g. {"model": ModelPart(critic, skip=is_head)} to load
        a policy's trunk into the critic). Returns the checkpoint's train state.

        A partial load (`only`) leaves the optimizer alone: when its model was loaded, call the
        optimizer's reload_model_params()."""
        from megatron.core import dist_checkpointing
        state = read_train_state(path)
        self._check_shape(path, state["shape"], "resume with the model config it was saved "
                          "with, or set train.resume=none" if only is None else
                          "use the model config it was saved with")
        receivers = {**self.sharded, **(parts or {})}
        names = list(self.sharded) if only is None else list(only)
        unknown = [n for n in names if n not in receivers]
        if unknown:
            raise ValueError(f"no sharded part named {unknown}; the parts are {list(receivers)}")
        wanted = {n: receivers[n].sharded_state_dict(is_loading=True) for n in names}
        loaded = dist_checkpointing.load(wanted, path)
        padded = state["shape"].get(PADDED_VOCAB), self.shape.get(PADDED_VOCAB)
        if padded[0] != padded[1]:
            zero_vocab_padding(wanted, loaded, self.shape["vocab_size"])
        for n in names:
            try:
                receivers[n].load_sharded_state_dict(loaded[n])
            except CheckpointError as err:
                raise CheckpointError(f"loading {n!r} from {path}: {err}") from None
        if only is None:
            self._load_states(path, state, padded)
        return state

    def _load_states(self, path: str, state: Dict, padded) -> None:
        missing = [n for n in self.states if n not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} holds no state {missing} (it has "
                                  f"{[k for k in state if k not in _RESERVED]}); it was written "
                                  "by another recipe")
        for n, s in self.states.items():
            s.load_state_dict(state[n])
        saved, now = state["layout"], _layout(self.topo)
        if saved == now:
            set_rng_state(torch.load(os.path.join(path, "rank_state", f"{self.topo.rank:05d}.pt"),
                                     weights_only=True))
        else:
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items()
                                if saved.get(k) != v)
            vocab = (f"; padded vocab {padded[0]} -> {padded[1]} rows (the padding rows are "
                     "zero)" if padded[0] != padded[1] else "")
            self.log(f"resuming step {state['step']} with a new layout ({changed}): weights and "
                     f"optimizer state resharded through dist_checkpointing{vocab}; RNG streams "
                     "restart from the seed")
        self.last_saved_step = state["step"]

