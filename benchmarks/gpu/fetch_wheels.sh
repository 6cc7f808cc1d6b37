#!/usr/bin/env bash
# Downloads, into .whl/ (gitignored), the Python packages benchmarks/gpu/check.sh needs that the
# lent GPU machine lacks (Python 3.12, x86-64, no network there): megatron-core 0.16.1 (a cp312
# wheel), Hydra and OmegaConf with antlr4 (an sdist only: built here into a py3 wheel), and
# Liger-Kernel for the loss comparison. Their own needs (torch, numpy, packaging, PyYAML,
# triton) are on that machine. About 4 MB; run once where pip reaches an index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0 liger-kernel==0.8.5
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
