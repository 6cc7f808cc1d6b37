#!/usr/bin/env bash
# Compile-checks the CUDA build without a GPU: every csrc/*.cu with nvcc for sm_90 (torch-free),
# then the torch glue ops_cuda.cpp with the host compiler (-fsyntax-only) against the installed
# torch's headers, CPU wheels included: those lack only the generated
# c10/cuda/impl/cuda_cmake_macros.h, which a shim supplies. Without nvcc it prints a skip line
# and succeeds. NVCC overrides the compiler path, PYTHON the python whose torch is used.
set -euo pipefail
shopt -s nullglob
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$nvcc" ]]; then
  echo "check_cuda: SKIP (nvcc not found)"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for src in "$here"/*.cu; do
  "$nvcc" -gencode=arch=compute_90,code=sm_90 -std=c++17 -O3 -Werror all-warnings \
    -Xcompiler -Wall -I"$here" -c "$src" -o "$out/$(basename "$src").o"
  echo "check_cuda: OK $(basename "$src")"
done

python="${PYTHON:-python3}"
torch_inc=$("$python" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))')
py_inc=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
cuda_inc="$(dirname "$(dirname "$(readlink -f "$nvcc")")")/include"
[[ -f "$cuda_inc/cuda_runtime_api.h" ]] || cuda_inc=/usr/local/cuda/include
mkdir -p "$out/shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
sys=(-isystem "$out/shim" -isystem "$cuda_inc" -isystem "$py_inc")
for inc in $torch_inc; do sys+=(-isystem "$inc"); done
"${CXX:-g++}" -std=c++17 -fsyntax-only -Wall -Wextra -Werror "${sys[@]}" -I"$here" \
  -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H "$here/ops_cuda.cpp"
echo "check_cuda: OK ops_cuda.cpp (syntax, against $("$python" -c 'import torch; print(torch.__version__)') headers)"
