#!/usr/bin/env bash
# On a GPU machine: build the extension (a failed CUDA build fails here), gate the CUDA kernels
# against float64 PyTorch (benchmarks/gpu/kernels.py), then sweep the fused linear cross-entropy
# benchmark on device=cuda over sizes (plus Liger-Kernel when it imports). check.sh runs the
# build, the gate and the headline size; this is the longer sweep. Extra arguments go to the
# benchmark, e.g. --tokens 4096 --vocab 32768.
# Env: PYTHON (default python), HIDDEN (default 4096), DTYPE (bf16|fp16|fp32, default bf16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 'need a CUDA torch and a visible GPU')"
"$PY" -m pip install -e . --no-build-isolation --no-deps   # builds _C and _C_cuda in place
"$PY" -m benchmarks.gpu.kernels
"$PY" -m benchmarks.fused_ce --device cuda --hidden "${HIDDEN:-4096}" --dtype "${DTYPE:-bf16}" \
  --liger "$@"
