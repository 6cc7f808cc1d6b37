#!/usr/bin/env bash
# The whole test suite (what `make test` and CI run). torchrun/torch elastic and wandb leave
# folders in TMPDIR, so the suite gets its own and removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d -t mext-tests-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
export TMPDIR="$tmp" WANDB_MODE=offline PYTHONDONTWRITEBYTECODE=1
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
