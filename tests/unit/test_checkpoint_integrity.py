"""Checkpoint manifests: a truncated or altered file is detected and the previous one is used."""
import os

from megatron_ext.training import checkpoint


def _make(root, step, payload):
    path = os.path.join(root, checkpoint.step_dir_name(step))
    os.makedirs(os.path.join(path, "rank_state"))
    for rel, data in payload.items():
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    checkpoint.write_manifest(path)
    return path


def test_verify_detects_truncation_flips_and_missing_files(tmp_path):
    root = str(tmp_path)
    files = {"a.distcp": b"x" * 1000, "rank_state/00000.pt": b"y" * 100}
    good = _make(root, 2, files)
    assert checkpoint.verify(good) is None
    truncated = _make(root, 4, files)
    with open(os.path.join(truncated, "a.distcp"), "r+b") as f:
        f.truncate(10)
    assert checkpoint.verify(truncated) == "file a.distcp has 10 bytes, manifest says 1000"
    flipped = _make(root, 6, files)
    with open(os.path.join(flipped, "rank_state/00000.pt"), "r+b") as f:
        f.seek(50)
        f.write(b"z")
    assert checkpoint.verify(flipped) == "file rank_state/00000.pt fails its sha256 check"
    missing = _make(root, 8, files)
    os.remove(os.path.join(missing, "a.distcp"))
    assert checkpoint.verify(missing) == "missing file a.distcp"
    unfinished = os.path.join(root, checkpoint.step_dir_name(10))
    os.makedirs(unfinished)
    assert "did not finish" in checkpoint.verify(unfinished)

    log = []
    assert checkpoint.find_resumable(root, log.append) == good
    assert [l.split(" is unusable")[0] for l in log] == [
        f"checkpoint {p}" for p in (unfinished, missing, flipped, truncated)]
    assert checkpoint.find_resumable(str(tmp_path / "none"), log.append) is None
