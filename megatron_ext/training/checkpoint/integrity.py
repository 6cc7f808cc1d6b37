"""Checkpoint integrity: whether a checkpoint folder is complete and intact before anything in
it is loaded or unpickled.

A committed checkpoint holds `manifest.json`: the size and sha256 of every other file. The
hashing is spread over the job as the writes are: dist_checkpointing writes `__<rank>_<n>.distcp`
on every rank and the common files (common.pt, metadata.json, torch's `.metadata`) on rank 0;
the manager adds `rank_state/<rank>.pt` per rank and `train_state.json` on rank 0. Each rank
fsyncs and hashes the files it wrote, rank 0 gathers the entries and writes the manifest, so
the commit costs one rank's share instead of the whole checkpoint read on rank 0. Verification
shares the files out by size in the same way and every rank gets the same verdict.

torch.distributed.checkpoint reads `.metadata` with plain pickle.load, so verification also
checks that it references only torch's checkpoint metadata classes."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank_state/(\d+)\.pt)$")


def writer_rank(rel: str, world_size: int) -> int:
    """The rank that wrote `rel` (and so hashes it): per-rank files by their name, the rest
    (common files, train state) rank 0."""
    match = _RANK_FILE.match(rel)
    rank = int(match.group(1) or match.group(2)) if match else 0
    return rank if rank < world_size else 0


def files(root: str) -> List[str]:
    """Every file under root but the manifest, as sorted relative paths."""
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names if f != MANIFEST)


def fsync_dir(path: str) -> None:
    """Make the names in the folder `path` durable (a rename, a new file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(root: str) -> None:
    """fsync_dir on root and every folder under it (the files are fsynced as they are hashed)."""
    for d, _, _ in os.walk(root):
        fsync_dir(d)


def _hash(path: str, sync: bool) -> Dict:
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        return {"size": os.fstat(f.fileno()).st_size, "sha256": digest}


def entries(root: str, rels: List[str], sync: bool = True) -> Dict[str, Dict]:
    """{rel: {size, sha256}} of the given files, each fsynced first when `sync`."""
    return {rel: _hash(os.path.join(root, rel), sync) for rel in rels}


def atomic_write(path: str, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary file and a rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(root: str, found: Optional[Dict[str, Dict]] = None) -> None:
    """Write root's manifest from `found` entries (default: hash every file here, in this
    process; what tools and tests use)."""
    found = entries(root, files(root)) if found is None else found
    atomic_write(os.path.join(root, MANIFEST),
                 json.dumps({"files": dict(sorted(found.items()))}, indent=1))


def _world() -> Tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def commit_manifest(root: str) -> None:
    """Collective over the world: every rank fsyncs and hashes the files it wrote under root,
    rank 0 gathers the entries, fsyncs the folders and writes the manifest."""
    rank, world = _world()
    mine = entries(root, [rel for rel in files(root) if writer_rank(rel, world) == rank])
    gathered = [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(mine, gathered, dst=0, group=dist.group.WORLD)
    else:
        gathered = [mine]
    if rank == 0:
        fsync_dirs(root)
        write_manifest(root, {rel: e for part in gathered for rel, e in part.items()})


# -- verification ---------------------------------------------------------------------------
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


def unsafe_pickle(path: str) -> Optional[str]:
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


def read_manifest(path: str):
    """(entries, None), or (None, what is wrong with the manifest)."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return None, "no manifest.json (the save did not finish)"
    try:
        with open(manifest) as f:
            return json.load(f)["files"], None
    except (ValueError, KeyError, TypeError) as err:
        return None, f"unreadable manifest.json ({err})"


def check_file(path: str, rel: str, meta: Dict) -> Optional[str]:
    """What is wrong with one file against its manifest entry, or None."""
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
        return f"missing file {rel}"
    size = os.path.getsize(full)
    if size != meta["size"]:
        return f"file {rel} has {size} bytes, manifest says {meta['size']}"
    if _hash(full, sync=False)["sha256"] != meta["sha256"]:
        return f"file {rel} fails its sha256 check"
    return None


def share_out(listed: Dict[str, Dict], world_size: int) -> List[List[str]]:
    """The manifest's files split into world_size lists of about equal bytes (largest first
    to the least loaded rank; deterministic, so every rank computes the same split)."""
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for rel in sorted(listed, key=lambda r: (-listed[r]["size"], r)):
        least = loads.index(min(loads))
        shares[least].append(rel)
        loads[least] += listed[rel]["size"]
    return shares


def _first_problem(path: str, listed: Dict[str, Dict], rels: List[str], pickle_check: bool):
    """(index, problem) of the first problem among `rels` in manifest order, or None. The
    `.metadata` pickle check (`pickle_check`) ranks after every file's (index len(listed))."""
    order = {rel: i for i, rel in enumerate(listed)}
    found = [(order[rel], p) for rel in rels if (p := check_file(path, rel, listed[rel]))]
    if pickle_check and (p := unsafe_pickle(path)):
        found.append((len(listed), p))
    return min(found) if found else None


def verify(path: str) -> Optional[str]:
    """None when the checkpoint is complete and intact, else what is wrong with it (this
    process reads every file)."""
    listed, problem = read_manifest(path)
    if problem is not None:
        return problem
    first = _first_problem(path, listed, list(listed), pickle_check=True)
    return None if first is None else first[1]


def verify_shared(path: str) -> Optional[str]:
    """`verify` as a collective over the world: rank 0 reads the manifest, every rank checks
    its share of the files, and every rank returns the same verdict (the first problem in
    manifest order)."""
    rank, world = _world()
    if world == 1:
        return verify(path)
    box = [read_manifest(path) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=dist.group.WORLD)
    listed, problem = box[0]
    if problem is not None:
        return problem
    mine = _first_problem(path, listed, share_out(listed, world)[rank], pickle_check=rank == 0)
    found = [None] * world
    dist.all_gather_object(found, mine, group=dist.group.WORLD)
    found = [f for f in found if f is not None]
    return min(found)[1] if found else None
