"""setup.py fails loudly: a .cu that nvcc cannot compile, or a C++ source the compiler rejects,
fails `setup.py build_ext` with a message naming the file and the opt-out variable, and the
opt-out installs without that extension. Each case builds a temp copy of setup.py + csrc/ in a
subprocess. nvcc is the real one when this machine has it, and always also a fake that fails
like nvcc on the broken file, so the decision logic is tested everywhere."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BROKEN = "zz_broken.cu"  # sorts after the real kernels: they are checked first and pass
FAKE_NVCC = r"""#!/bin/bash
echo "$*" >> "$(dirname "$0")/calls.log"
out=; src=
while [[ $# -gt 0 ]]; do case $1 in -o) out=$2; shift;; *.cu) src=$1;; esac; shift; done
if grep -q MEXT_BROKEN "$src"; then
  echo "$src(1): error: identifier \"MEXT_BROKEN\" is undefined" >&2
  echo "1 error detected in the compilation of \"$src\"." >&2
  exit 2
fi
: > "$out"
"""
FAKE_CXX = r"""#!/bin/bash
for a in "$@"; do [[ $a == -c ]] && { echo "fakecxx: error: cannot compile" >&2; exit 1; }; done
exec g++ "$@"
"""


def _real_nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None)


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _tree(tmp_path: Path, broken_cu: bool) -> Path:
    tree = tmp_path / "repo"
    tree.mkdir()
    shutil.copy(ROOT / "setup.py", tree)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    if broken_cu:
        (tree / "csrc" / BROKEN).write_text("int broken() { return MEXT_BROKEN; }\n")
    return tree


def _build(tree: Path, nvcc: Path, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEGATRON_EXT_")}
    clean.update(CUDA_HOME=str(nvcc.parent.parent), PATH=f"{nvcc.parent}:{clean['PATH']}", **env)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                         env=clean, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(params=["fake", "real"])
def nvcc(request, tmp_path):
    if request.param == "fake":
        return _script(tmp_path / "cuda" / "bin" / "nvcc", FAKE_NVCC)
    real = _real_nvcc()
    if real is None:
        pytest.skip("no real nvcc here; the fake-nvcc case covers the decision logic")
    return Path(real)


def test_a_broken_cu_fails_the_build_naming_the_file(tmp_path, nvcc):
    code, out = _build(_tree(tmp_path, broken_cu=True), nvcc, MEGATRON_EXT_SKIP_CPP="1")
    assert code != 0, out
    assert f"nvcc could not compile csrc/{BROKEN}" in out, out
    assert "MEXT_BROKEN" in out  # nvcc's own error comes along
    assert "set MEGATRON_EXT_SKIP_CUDA=1" in out
    for good in ("fused_ce_kernels.cu", "swiglu_kernels.cu"):
        assert f"checked csrc/{good}" in out, out


def test_the_opt_out_installs_without_the_cuda_build(tmp_path, nvcc):
    tree = _tree(tmp_path, broken_cu=True)
    code, out = _build(tree, nvcc, MEGATRON_EXT_SKIP_CPP="1", MEGATRON_EXT_SKIP_CUDA="1")
    assert code == 0, out
    assert "MEGATRON_EXT_SKIP_CUDA is set: megatron_ext.ops._C_cuda is not built" in out
    assert "nvcc could not compile" not in out and not list(tree.rglob("_C_cuda*.so"))
    assert not (nvcc.parent / "calls.log").exists()  # the fake nvcc was never called


def test_a_failing_cpp_build_fails_naming_the_sources(tmp_path):
    tree = _tree(tmp_path, broken_cu=False)
    cxx = str(_script(tmp_path / "bin" / "fakecxx", FAKE_CXX))
    nvcc = _script(tmp_path / "cuda" / "bin" / "nvcc", FAKE_NVCC)
    code, out = _build(tree, nvcc, CC=cxx, CXX=cxx, MEGATRON_EXT_SKIP_CUDA="1")
    assert code != 0, out
    assert "building megatron_ext.ops._C from csrc/fused_ce_cpu.cpp" in out, out
    assert "fakecxx: error: cannot compile" in out  # the compiler's error is shown
    assert "set MEGATRON_EXT_SKIP_CPP=1" in out
    assert not (nvcc.parent / "calls.log").exists()  # CUDA opted out: nvcc never ran


def test_without_torch_at_build_time_the_build_says_how_to_install(tmp_path):
    tree = _tree(tmp_path, broken_cu=False)
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'build_ext']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "needs torch at build time" in run.stderr and "--no-build-isolation" in run.stderr
