#!/usr/bin/env bash
# Compile-checks every csrc/*.cu for sm_90 (no torch headers involved, no GPU needed).
# Without nvcc it prints a skip line and succeeds. NVCC overrides the compiler path.
set -euo pipefail
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
