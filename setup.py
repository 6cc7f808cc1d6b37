"""Package metadata and the build of csrc/.

csrc/ becomes megatron_ext.ops._C (C++ with ATen and OpenMP) and, with nvcc and a CUDA torch,
megatron_ext.ops._C_cuda. A build that fails fails the install with a message naming the
sources: a silent fallback would train on the slow PyTorch reference. Opt-outs, each its own:
  MEGATRON_EXT_SKIP_CUDA=1  no CUDA kernels (on a GPU, model.fused_*=auto then uses megatron's)
  MEGATRON_EXT_SKIP_CPP=1   no C++ kernels (CPU tensors use the PyTorch reference; the unit
                            tests refuse that)
Wherever nvcc exists, the build first compiles each csrc/*.cu on its own (torch-free, seconds): a
broken kernel fails at once with nvcc's error for that file. With a CPU-only torch that check
is all the CUDA build does.
"""

import glob
import os
import shutil
import subprocess
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/{s}" for s in ("fused_ce_cpu.cpp", "swiglu_cpu.cpp", "bindings_cpu.cpp")]
CU_SOURCES = sorted(glob.glob(f"{CSRC}/*.cu"))
CUDA_SOURCES = [f"{CSRC}/ops_cuda.cpp"] + CU_SOURCES
CPP_EXT, CUDA_EXT = "megatron_ext.ops._C", "megatron_ext.ops._C_cuda"
SKIP = {CPP_EXT: "MEGATRON_EXT_SKIP_CPP", CUDA_EXT: "MEGATRON_EXT_SKIP_CUDA"}


def _skipped(ext: str) -> bool:
    return os.environ.get(SKIP[ext], "").strip().lower() in ("1", "true", "yes")


def _nvcc(cuda_home):
    """The nvcc the CUDA build would use (torch's CUDA_HOME first), or None."""
    home = cuda_home or os.environ.get("CUDA_HOME")
    found = [os.path.join(home, "bin", "nvcc")] if home else []
    found += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((path for path in found if path and os.path.exists(path)), None)


def check_cu_sources(nvcc: str, arch_flags) -> None:
    """Compile each .cu alone (no torch headers): a failure names its file and nvcc's error."""
    with tempfile.TemporaryDirectory() as out:
        for src in CU_SOURCES:
            cmd = [nvcc, "-std=c++17", "-O3", *arch_flags, f"-I{CSRC}", "-c", src,
                   "-o", os.path.join(out, os.path.basename(src) + ".o")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                log = "\n".join((run.stdout + run.stderr).strip().splitlines()[-20:])
                raise CompileError(f"nvcc could not compile {src} (exit {run.returncode}):\n{log}"
                                   f"\nFix {src}, or set {SKIP[CUDA_EXT]}=1 to install without "
                                   "the CUDA kernels")
            print(f"checked {src} with {nvcc}")


class NeedTorch(build_ext):
    """Stands in when torch is not importable at build time (pip's build isolation)."""

    def run(self):
        raise CompileError("building csrc/ needs torch at build time: install torch first, then "
                           "`pip install --no-build-isolation -e .`, or set "
                           f"{'=1 '.join(SKIP.values())}=1 to install without the kernels")


def _extensions():
    """(ext_modules, cmdclass) for the extensions not opted out."""
    wanted = [ext for ext in SKIP if not _skipped(ext)]
    for ext in SKIP:
        if ext not in wanted:
            print(f"{SKIP[ext]} is set: {ext} is not built")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return ([Extension(CPP_EXT, CPU_SOURCES)], {"build_ext": NeedTorch}) if wanted else ([], {})

    nvcc = _nvcc(cpp_extension.CUDA_HOME) if CUDA_EXT in wanted else None
    cuda_torch = bool(torch.version.cuda)
    if CUDA_EXT in wanted and not (nvcc and cuda_torch):
        wanted.remove(CUDA_EXT)
        print(f"{CUDA_EXT} is not built: " + (
            "no nvcc found" if nvcc is None else
            f"torch {torch.__version__} has no CUDA (its .cu files are compile-checked)"))
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    include = [os.path.abspath(CSRC)]
    make = {
        CPP_EXT: lambda: cpp_extension.CppExtension(
            CPP_EXT, CPU_SOURCES, include_dirs=include,
            extra_compile_args={"cxx": ["-O3"] + openmp}, extra_link_args=openmp),
        CUDA_EXT: lambda: cpp_extension.CUDAExtension(
            CUDA_EXT, CUDA_SOURCES, include_dirs=include,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}),
    }

    class BuildExt(cpp_extension.BuildExtension):
        """Checks the .cu files first, then builds each extension; any failure fails the build
        naming the sources and the opt-out (the compiler's own error is printed above it)."""

        def run(self):
            if nvcc is not None:
                check_cu_sources(nvcc, cpp_extension._get_cuda_arch_flags() if cuda_torch else [])
            super().run()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                first = (str(err).strip().splitlines() or [""])[0]
                raise CompileError(
                    f"building {ext.name} from {', '.join(ext.sources)} failed "
                    f"({type(err).__name__}: {first}); the compiler's error is above. Fix it, "
                    f"or set {SKIP[ext.name]}=1 to install without it") from err

    return [make[ext]() for ext in wanted], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron-ext",
    version="0.1.0",
    description="megatron-core extended for long-context reasoning models",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_ext*", "parallel*", "launch*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "hydra-core>=1.3,<1.4",
        "omegaconf",
        "wandb",
        "nvidia-ml-py",
        "numpy",
        "tqdm",
        "pyyaml",
        "psutil",  # megatron dist_checkpointing's writer processes
        "tokenizers",  # HF tokenizer.json files (data.tokenizer=PATH)
        "math-verify==0.9.0",  # the math reward (rl.rewards name: math); parses, never evaluates
        "transformers==5.23.0",  # HF model configs, tokenizers, chat templates (model=hf)
        "safetensors==0.8.0",  # lazy per-rank reads of HF weights, export
        "matplotlib",  # trace-fidelity report histograms
    ],
    package_data={"launch": ["templates/*"]},
    extras_require={"test": ["pytest"], "gpu": ["transformer-engine", "flash-attn"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
