"""Checkpoint manifests: a truncated, altered or missing file and a hostile `.metadata` pickle
are named; the per-rank split of the hashing covers every file once and gives the manifest a
single process writes; the verification shares are balanced and complete."""
import json
import os
import pickle

import pytest

from megatron_ext.training.checkpoint import integrity

FILES = {"__0_0.distcp": b"a" * 1000, "__0_1.distcp": b"b" * 700, "__1_0.distcp": b"c" * 900,
         "__1_1.distcp": b"d" * 10, "__3_0.distcp": b"e" * 50, ".metadata": pickle.dumps({}),
         "common.pt": b"f" * 30, "metadata.json": b"{}", "train_state.json": b"{}",
         "rank_state/00000.pt": b"g" * 100, "rank_state/00001.pt": b"h" * 100}


def _make(root, name, payload=FILES):
    path = os.path.join(root, name)
    for rel, data in payload.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    integrity.write_manifest(path)
    return path


def test_verify_detects_truncation_flips_and_missing_files(tmp_path):
    root = str(tmp_path)
    assert integrity.verify(_make(root, "good")) is None
    truncated = _make(root, "truncated")
    with open(os.path.join(truncated, "__0_0.distcp"), "r+b") as f:
        f.truncate(10)
    assert integrity.verify(truncated) == "file __0_0.distcp has 10 bytes, manifest says 1000"
    flipped = _make(root, "flipped")
    with open(os.path.join(flipped, "rank_state/00001.pt"), "r+b") as f:
        f.seek(50)
        f.write(b"z")
    assert integrity.verify(flipped) == "file rank_state/00001.pt fails its sha256 check"
    missing = _make(root, "missing")
    os.remove(os.path.join(missing, "common.pt"))
    assert integrity.verify(missing) == "missing file common.pt"
    unfinished = os.path.join(root, "unfinished")
    os.makedirs(unfinished)
    assert integrity.verify(unfinished) == "no manifest.json (the save did not finish)"
    garbled = _make(root, "garbled")
    with open(os.path.join(garbled, integrity.MANIFEST), "w") as f:
        f.write("{")
    assert integrity.verify(garbled).startswith("unreadable manifest.json")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_verify_refuses_a_forbidden_pickle_global_without_running_it(tmp_path):
    hostile = _make(str(tmp_path), "hostile", {**FILES, ".metadata": pickle.dumps(_Evil())})
    assert integrity.verify(hostile) == ("file .metadata references posix.system, which a "
                                         "checkpoint never holds; refusing to unpickle it")
    garbled = _make(str(tmp_path), "garbled", {**FILES, ".metadata": b"\x80\x04junk"})
    assert integrity.verify(garbled).startswith("file .metadata is unreadable")
    # the hash check comes first: a corrupt file is named before the pickle
    os.remove(os.path.join(hostile, "common.pt"))
    assert integrity.verify(hostile) == "missing file common.pt"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_per_rank_hashing_gives_the_single_process_manifest(tmp_path, world_size):
    path = _make(str(tmp_path), "ckpt")
    single = json.load(open(os.path.join(path, integrity.MANIFEST)))["files"]
    rels = integrity.files(path)
    owners = {rel: integrity.writer_rank(rel, world_size) for rel in rels}
    per_rank = [integrity.entries(path, [r for r in rels if owners[r] == rank])
                for rank in range(world_size)]
    merged = {rel: e for part in per_rank for rel, e in part.items()}
    assert sum(len(p) for p in per_rank) == len(rels) == len(single)  # each file once
    assert merged == single
    if world_size == 4:  # per-rank files go to their writer, the common ones to rank 0
        assert {r for r, o in owners.items() if o == 1} == {"__1_0.distcp", "__1_1.distcp",
                                                            "rank_state/00001.pt"}
        assert owners["__3_0.distcp"] == 3 and owners["common.pt"] == 0
    if world_size == 2:  # a rank past the world (another layout's file) falls to rank 0
        assert owners["__3_0.distcp"] == 0


def test_verification_shares_cover_every_file_once_and_balance_bytes():
    listed = {f"__{i}_0.distcp": {"size": s} for i, s in enumerate([900, 800, 500, 400, 300,
                                                                     100, 50, 10])}
    shares = integrity.share_out(listed, 3)
    assert sorted(r for s in shares for r in s) == sorted(listed)
    loads = [sum(listed[r]["size"] for r in s) for s in shares]
    assert max(loads) <= 4 / 3 * sum(loads) / 3, loads  # greedy largest-first bound
    assert integrity.share_out(listed, 3) == shares  # every rank computes the same split
