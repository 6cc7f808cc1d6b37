"""`python -m megatron_ext.align` end to end, as a user runs it."""
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_ext.align.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _align(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.align", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_make_traces_compare_filter_profile(tmp_path):
    ref, cand = tmp_path / "ref.jsonl", tmp_path / "cand.jsonl"
    _align("make-traces", "--n", 80, "--style", "target", "--min-ops", 2, "--max-ops", 4, "--out", ref)
    _align("make-traces", "--n", 20, "--style", "verbose", "--min-ops", 2, "--max-ops", 4, "--seed", 1, "--out", cand)
    assert len(ref.read_text().splitlines()) == 80

    out = tmp_path / "report"
    proc = _align("compare", "--reference", ref, "--candidate", cand, "--out", out)
    assert "dataset score" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["dataset_score"] < 0.2
    assert len(report["traces"]) == 20
    assert all({"index", "score", "reasons"} <= set(t) and t["reasons"] for t in report["traces"])
    assert [t["index"] for t in report["traces"]] == list(range(20))
    assert {"features", "distributions", "reason_counts"} <= set(report)
    md = (out / "report.md").read_text()
    pngs = sorted(out.glob("hist_*.png"))
    assert len(pngs) >= 8 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f"]({p.name})" in md for p in pngs)

    kept, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    proc = _align("filter", "--reference", ref, "--candidate", cand, "--min-score", 0.5,
                  "--out-kept", kept, "--out-rejected", rejected)
    assert "kept 0 traces" in proc.stdout
    assert kept.read_text() == "" and len(rejected.read_text().splitlines()) == 20

    _align("profile", "--input", ref, "--out", tmp_path / "profile")
    summary = json.loads((tmp_path / "profile" / "profile.json").read_text())
    assert summary["n_traces"] == 80 and summary["answer_correct_rate"] == 1.0


def test_malformed_input_names_file_and_line(tmp_path, capsys):  # in-process: same CLI, no extra launches
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "response": "1+1=2\\nA: 2"}\n{"prompt": "Q", "response": \n')
    assert main(["profile", "--input", str(bad), "--out", str(tmp_path / "p")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert main(["profile", "--input", str(bad), "--out", str(tmp_path / "p"), "--skip-malformed"]) == 0
    out = capsys.readouterr()
    assert f"{bad}:2:" in out.err and "profiled 1 traces" in out.out
    assert main(["filter", "--reference", str(bad), "--candidate", str(bad), "--min-score", "2",
                 "--out-kept", str(tmp_path / "k"), "--out-rejected", str(tmp_path / "r")]) == 2
    assert "--min-score=2.0 is outside [0, 1]" in capsys.readouterr().err
