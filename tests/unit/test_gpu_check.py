"""benchmarks/gpu/: each piece of check.sh runs its CPU dry run, prints its markdown table and
exits 0 only when every row passed; check.sh parses. The GPU run itself cannot happen here."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _piece(module: str, tmp_path: Path, *extra: str):
    out = tmp_path / "tables.md"
    run = subprocess.run([sys.executable, "-m", f"benchmarks.gpu.{module}", "--dry-run",
                          "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
                                           "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)})
    return run, out.read_text() if out.exists() else ""


def _rows(table: str, header: str):
    """Data rows of the markdown table whose header line starts with `header`."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_check_sh_parses():
    run = subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu/check.sh")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_kernels_dry_run_checks_every_op_and_dtype(tmp_path):
    run, table = _piece("kernels", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(table, "check")
    assert rows[0][:4] == ["backend serving", "-", "-", "cpp"] and rows[0][-1] == "ok"
    checks = {(r[0], r[1]) for r in rows}
    for dtype in ("float32", "bfloat16"):
        for op in ("fused CE loss", "fused CE d_hidden", "fused CE d_weight", "swiglu fwd",
                   "swiglu bwd"):
            assert (op, dtype) in checks, (op, dtype)
    assert sum("fp32 sums" in r[0] for r in rows) == 2
    assert all(r[-1] == "ok" for r in rows) and all(float(r[4]) < 3e-2 for r in rows[1:])


def test_loss_dry_run_times_ours_against_megatron(tmp_path):
    run, table = _piece("loss", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r[0]: r for r in _rows(table, "method")}
    assert rows["ours (fused linear CE)"][2] == "1.00"
    assert rows["megatron vocab-parallel CE"][-1] == "ok"
    assert float(rows["megatron vocab-parallel CE"][1]) > 0
    liger = rows["Liger fused linear CE"][-1]
    assert liger == "ok" or liger.startswith("skip (liger_kernel does not import")


def test_attention_dry_run_says_for_every_backend_what_happened(tmp_path):
    run, table = _piece("attention", tmp_path)
    parity = _rows(table, "model.attention_backend")
    speed = _rows(table, "kernel")
    assert {r[-1].split()[0] for r in parity} <= {"ok", "FAIL", "skip"} and parity
    for r in parity:  # a FAIL or skip says why; flash/te may only skip for a missing package
        assert r[-1] == "ok" or "(" in r[-1]
        if r[-1].startswith("skip"):
            assert "does not import" in r[-1]
    assert {r[0] for r in speed} >= {"sdpa (default)", "sdpa math (materialised, like local)"}
    assert all(r[-1] == "ok" and float(r[3]) > 0 for r in speed)
    failed = any(r[-1].startswith("FAIL") for r in parity + speed)
    assert (run.returncode != 0) == failed, run.stdout + run.stderr


@pytest.mark.parametrize("module, extra, header", [
    ("smoke", ("--run-root",), "run"), ("mfu", ("--run-dir",), "params N")])
def test_training_pieces_dry_run(tmp_path, module, extra, header):
    run, table = _piece(module, tmp_path, extra[0], str(tmp_path / "runs"))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(table, header)
    assert rows and all(r[-1] == "ok" for r in rows)
    if module == "smoke":
        assert [r[0] for r in rows] == ["SFT", "GRPO"]
        assert rows[0][1] == "10" and rows[1][1] == "3"
    else:
        assert float(rows[0][2].replace(",", "")) > 0  # tokens/s from metrics.jsonl


def test_engines_dry_run_runs_ours_and_says_why_megatron_skipped(tmp_path):
    run, table = _piece("engines", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r[0]: r for r in _rows(table, "engine")}
    assert rows["ours"][-1] == "ok" and int(rows["ours"][2]) > 0
    megatron = rows["megatron (DynamicInferenceEngine)"][-1]
    try:
        import flash_attn  # noqa: F401
        assert megatron == "skipped: dry run (CPU)"
    except ImportError:
        assert megatron == "skipped: flash-attn not installed"
