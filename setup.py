"""Package metadata and the build of csrc/.

csrc/ becomes megatron_ext.ops._C (C++ with ATen and OpenMP, on every machine) and, when torch
has CUDA and nvcc exists, megatron_ext.ops._C_cuda. A failed build prints one warning and the
install still succeeds: megatron_ext.ops then serves its PyTorch reference, so a machine without
a working compiler can still train and test.
"""

import glob
import os

from setuptools import find_packages, setup

CSRC = "csrc"
CPU_SOURCES = ["fused_ce_cpu.cpp", "swiglu_cpu.cpp", "bindings_cpu.cpp"]
CUDA_SOURCES = ["ops_cuda.cpp"] + sorted(os.path.basename(p) for p in glob.glob(f"{CSRC}/*.cu"))


def _extensions():
    """(ext_modules, cmdclass); empty when torch is not importable at build time."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("WARNING: torch is not importable; skipping the csrc/ build (torch reference serves)")
        return [], {}

    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    cxx = ["-O3"] + openmp
    include = [os.path.abspath(CSRC)]
    exts = [
        cpp_extension.CppExtension(
            "megatron_ext.ops._C",
            [f"{CSRC}/{s}" for s in CPU_SOURCES],
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    ]
    cuda_home = cpp_extension.CUDA_HOME
    if torch.version.cuda and cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        exts.append(
            cpp_extension.CUDAExtension(
                "megatron_ext.ops._C_cuda",
                [f"{CSRC}/{s}" for s in CUDA_SOURCES],
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )

    class BuildExt(cpp_extension.BuildExtension):
        """Builds each extension on its own; a failure warns and leaves the torch reference.

        Failed extensions are dropped from self.extensions, so the in-place copy that editable
        installs make afterwards does not look for their missing .so files.
        """

        def build_extensions(self):
            self._failed = []
            super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler/linker failure
                self._failed.append(ext)
                first = str(err).strip().splitlines()[:1] or [""]
                print(f"WARNING: building {ext.name} failed ({type(err).__name__}: {first[0]}); "
                      "megatron_ext.ops falls back to the PyTorch reference")

    return exts, {"build_ext": BuildExt.with_options(use_ninja=True)}


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
        "matplotlib",  # trace-fidelity report histograms
    ],
    package_data={"launch": ["templates/*"]},
    extras_require={"test": ["pytest"], "gpu": ["transformer-engine", "flash-attn"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
