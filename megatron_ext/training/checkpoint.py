"""Checkpoints: megatron dist_checkpointing for the model and optimizer (sharded, reshardable
across TP/PP/DP), plus what megatron does not keep (step, LR schedule, data position, RNG states
of every rank, the W&B run id, the resolved config), committed atomically.

A checkpoint is written into `.tmp-step_N`, fsynced, described by `manifest.json` (size and
sha256 of every file), renamed to `step_N`, and only then does `latest` point at it. On resume
the newest checkpoint whose manifest verifies is used; a partial or corrupt one is named and
skipped. Nothing unpickles arbitrary objects: our torch files load with weights_only=True (as
megatron's common.pt does under torch's default), and torch's `.metadata` file, which
torch.distributed.checkpoint reads with plain pickle.load, is first checked to hold only its own
metadata classes (`verify`)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
# Shape keys a checkpoint must share with the model that loads it.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "tie_embeddings")
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and the reason."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> List[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names if f != MANIFEST)


def _fsync_tree(root: str) -> None:
    for d, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def write_manifest(root: str) -> None:
    entries = {rel: {"size": os.path.getsize(os.path.join(root, rel)),
                     "sha256": _sha256(os.path.join(root, rel))} for rel in _files(root)}
    _atomic_write(os.path.join(root, MANIFEST), json.dumps({"files": entries}, indent=1))


def _safe_pickle_globals() -> set:
    """(module, name) of what a DCP `.metadata` pickle may reference: torch's checkpoint
    metadata classes, torch.Size, the dtypes, and the layout helper."""
    import torch.distributed.checkpoint.filesystem as dcp_fs
    import torch.distributed.checkpoint.metadata as dcp_meta
    import torch.distributed.checkpoint.planner as dcp_plan
    allowed = {(m.__name__, n) for m in (dcp_meta, dcp_plan) for n, obj in vars(m).items()
               if isinstance(obj, type) and obj.__module__ == m.__name__}
    allowed |= {("torch", "Size"), ("torch.serialization", "_get_layout"),
                (dcp_fs.__name__, "_StorageInfo"), ("collections", "OrderedDict")}
    allowed |= {("torch", n) for n, obj in vars(torch).items() if isinstance(obj, torch.dtype)}
    return allowed


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    allowed: set = set()

    def find_class(self, module, name):
        if (module, name) not in self.allowed:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _unsafe_pickle(path: str) -> Optional[str]:
    """What is wrong with the checkpoint's DCP `.metadata` pickle, or None: it may reference
    nothing but checkpoint metadata, because torch loads it with plain pickle.load."""
    meta = os.path.join(path, ".metadata")
    if not os.path.isfile(meta):
        return None
    if not _MetadataUnpickler.allowed:
        _MetadataUnpickler.allowed = _safe_pickle_globals()
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except _ForbiddenGlobal as err:
        return (f"file .metadata references {err}, which a checkpoint never holds; refusing "
                "to unpickle it")
    except Exception as err:  # truncated or garbled: pickle raises many kinds
        return f"file .metadata is unreadable ({type(err).__name__}: {err})"
    return None


def verify(path: str) -> Optional[str]:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return "no manifest.json (the save did not finish)"
    try:
        entries = json.load(open(manifest))["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    for rel, meta in entries.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"missing file {rel}"
        if os.path.getsize(full) != meta["size"]:
            return f"file {rel} has {os.path.getsize(full)} bytes, manifest says {meta['size']}"
        if _sha256(full) != meta["sha256"]:
            return f"file {rel} fails its sha256 check"
    return _unsafe_pickle(path)


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """(step, path) of committed step_N folders, newest first."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, n))
             for n in os.listdir(root) if (m := _STEP_DIR.match(n))]
    return sorted(found, reverse=True)


def find_resumable(root: str, log: Callable[[str], None]) -> Optional[str]:
    """The newest checkpoint under root that verifies; each bad one is reported by name."""
    for _, path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is unusable: {problem}; trying the previous one")
    return None


# -- rank-local state ---------------------------------------------------------------------
def _rng_state() -> Dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, tracker_state in get_cuda_rng_tracker().get_states().items():
        state[f"tracker.{name}"] = tracker_state
    return state


def _set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = {k[len("tracker."):]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# -- save / load ----------------------------------------------------------------------------
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


def _use_results_queue(background: bool) -> None:
    """Where megatron's writers report their results. Its default is a queue served by a
    spawned Manager process, made at the first save and kept; under SLURM a requeue or scancel
    can end that process while the trainer lives on to save (seen in CI: BrokenPipeError in
    the SIGTERM save). A synchronous save writes and collects in this process, so an
    in-process queue serves it; a background save's writer is a forked process and keeps
    megatron's Manager queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    current = fsa._results_queue
    if background:
        fsa._results_queue = _MANAGER_QUEUE.get("queue")  # None: megatron makes one
    else:
        if current is not None and not isinstance(current, queue.Queue):
            _MANAGER_QUEUE["queue"] = current  # kept for the next background save
        fsa._results_queue = queue.Queue()


_MANAGER_QUEUE: Dict = {}


def _sharded_state(trainer, is_loading: bool) -> Dict:
    chunks = [getattr(c, "module", c) for c in trainer.model]
    model = ({"model": chunks[0].sharded_state_dict()} if len(chunks) == 1 else
             {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)})
    state = dict(model)
    state["optimizer"] = trainer.optimizer.sharded_state_dict(
        model, is_loading=is_loading, metadata=_OPTIM_METADATA)
    return state


def _layout(topo) -> Dict:
    """The parallel layout a checkpoint was written under; a change means resharding."""
    d = topo.dims
    return {"world_size": d.world_size, "tp": d.tp, "pp": d.pp, "cp": d.cp, "vpp": d.vpp,
            "dp": d.dp}


def _shape(trainer) -> Dict:
    """The model shape a checkpoint must match; the padded vocab depends on tp, so a TP change
    that alters it is caught here rather than as a tensor-shape error inside the load."""
    shape = {k: getattr(trainer.cfg.model, k) for k in SHAPE_KEYS}
    return shape | {"vocab_size": trainer.vocab_size,
                    "padded_vocab_size": getattr(trainer.model[0], "module", trainer.model[0]).vocab_size}


def save(trainer, root: str, tag: Optional[str] = None, keep: int = 3,
         background=None, on_commit: Optional[Callable[[str], None]] = None) -> str:
    """Write a checkpoint of the trainer's current state; returns its final path. With `tag`
    (e.g. "bad-state") it is written beside the regular ones and `latest` does not move.

    With `background` (megatron's AsyncCallsQueue) the sharded tensors are written by a forked
    process, whose copy-on-write view of memory is the state at this step, and the call returns
    once the small files are written; the commit (manifest, rename, `latest`, `on_commit`)
    runs when the queue finalizes the write on every rank. Until then nothing points at it."""
    from megatron.core import dist_checkpointing
    topo, step = trainer.topo, trainer.step
    name = step_dir_name(step) if tag is None else f"{tag}_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if topo.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group=dist.group.WORLD)
    _use_results_queue(background is not None)
    with _children_shielded():
        request = dist_checkpointing.save(_sharded_state(trainer, is_loading=False), tmp,
                                          async_sharded_save=background is not None)
    os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rank_state", f"{topo.rank:05d}.pt"))
    if topo.rank == 0:
        state = trainer.train_state()
        state.update(shape=_shape(trainer), layout=_layout(topo))
        _atomic_write(os.path.join(tmp, TRAIN_STATE), json.dumps(state, indent=1))

    def commit() -> None:
        _commit(topo.rank, root, tmp, final, name, tag, keep)
        if on_commit is not None:
            on_commit(final)

    if background is None:
        commit()
    else:
        request.add_finalize_fn(commit)  # after megatron's own (its metadata, a barrier)
        with _children_shielded():  # the writer process ignores SLURM's signals
            background.schedule_async_request(request)
    return final


def _commit(rank: int, root: str, tmp: str, final: str, name: str, tag: Optional[str],
            keep: int) -> None:
    """Every rank's files are in `tmp`: verify-able manifest, rename, then move `latest`."""
    dist.barrier(group=dist.group.WORLD)
    if rank == 0:
        _fsync_tree(tmp)
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_tree(root)
        if tag is None:
            _atomic_write(os.path.join(root, "latest"), name + "\n")
            for _, old in list_checkpoints(root)[max(keep, 1):]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=dist.group.WORLD)


def load(trainer, path: str, log: Callable[[str], None]) -> Dict:
    """Restore model, optimizer and train state from `path` into the trainer (any layout)."""
    from megatron.core import dist_checkpointing
    topo = trainer.topo
    state = json.load(open(os.path.join(path, TRAIN_STATE)))
    want = _shape(trainer)
    if state["shape"] != want:
        diff = {k: (state["shape"].get(k), v) for k, v in want.items() if state["shape"].get(k) != v}
        raise CheckpointError(
            f"checkpoint {path} is from another model shape: (checkpoint, config) = {diff}; "
            "resume with the model config it was saved with, or set train.resume=none")
    loaded = dist_checkpointing.load(_sharded_state(trainer, is_loading=True), path)
    chunks = [getattr(c, "module", c) for c in trainer.model]
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    saved = state["layout"]
    now = _layout(topo)
    rank_file = os.path.join(path, "rank_state", f"{topo.rank:05d}.pt")
    if saved == now:
        _set_rng_state(torch.load(rank_file, weights_only=True))
    else:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
        log(f"resuming step {state['step']} with a new layout ({changed}): weights and optimizer "
            "state resharded through dist_checkpointing; RNG streams restart from the seed")
    trainer.load_train_state(state)
    return state
