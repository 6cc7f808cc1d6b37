"""The CUDA build compile-checks wherever nvcc exists (no GPU needed): the torch-free .cu kernels
for sm_90 with nvcc, and the torch glue ops_cuda.cpp with the host compiler against this
torch's headers (a CPU wheel's too); a broken glue file fails the check, naming the file."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).parents[2] / "csrc"


def _nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None)


needs_nvcc = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found on PATH or in /usr/local")


def _check(csrc: Path):
    return subprocess.run(["bash", str(csrc / "check_cuda.sh")], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "NVCC": _nvcc(),
                                            "PYTHON": sys.executable})


@needs_nvcc
def test_every_cu_file_and_the_torch_glue_compile():
    out = _check(CSRC)
    assert out.returncode == 0, out.stdout + out.stderr
    for cu in sorted(CSRC.glob("*.cu")):
        assert f"OK {cu.name}" in out.stdout, out.stdout
    assert "OK ops_cuda.cpp" in out.stdout, out.stdout


@needs_nvcc
def test_a_broken_torch_glue_fails_the_check(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(CSRC, csrc, ignore=shutil.ignore_patterns("*.cu"))  # the glue alone
    glue = csrc / "ops_cuda.cpp"
    glue.write_text(glue.read_text().replace("at::mm_out(acc, a, b, at::kFloat);",
                                             "at::mm_out(acc, a, b, at::kFloat, 1);"))
    out = _check(csrc)
    assert out.returncode != 0 and "OK ops_cuda.cpp" not in out.stdout
    assert "ops_cuda.cpp" in out.stderr, out.stderr
