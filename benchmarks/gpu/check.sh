#!/usr/bin/env bash
# The GPU check, on one GPU with nothing but this repo and the wheels in .whl/: builds the
# extension with `pip install -e .`, checks the CUDA kernels and every attention backend
# against PyTorch references, runs a 1-GPU SFT and GRPO smoke, measures MFU of the 1b preset,
# the loss (ours vs megatron's vs Liger), attention TFLOPS, our engine's decode from CUDA graphs
# against eager decode and, where flash-attn imports, our generation engine against megatron's
# on the same weights; writes docs/results_gpu.md with
# the date and the card, and copies it with the logs to $OUT. Under 8 minutes: each stage has a
# time limit, stages run by priority, and one that would pass the 450 s deadline is skipped
# (marked so); a failed stage does not stop the others. Exit code 1 when any stage failed.
#
# Once, where pip reaches an index (the wheels are gitignored):
#   bash benchmarks/gpu/fetch_wheels.sh
# Then, with the device tool, from the checkout the session was started in:
#   run(command="bash benchmarks/gpu/check.sh", carry=[".whl"], timeout_s=540)
# and copy the returned results_gpu.md to docs/results_gpu.md. Anywhere else with a GPU:
#   OUT=/tmp/gpu_check bash benchmarks/gpu/check.sh
# Env: PYTHON (default python3), DEADLINE_S (450), OUT (default outputs/gpu_check), DRY_RUN=1
# (a CPU rehearsal: no build, every piece with --dry-run, results only under $OUT).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/outputs/gpu_check}"
DEADLINE_S="${DEADLINE_S:-450}"
DRY_RUN="${DRY_RUN:-}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
LOG="$OUT/stages.log"
: >"$LOG"
SUMMARY="$WORK/summary.md"
TABLES="$WORK/tables.md"
: >"$TABLES"
printf '| stage | seconds | result |\n|---|---:|---|\n' >"$SUMMARY"
FAILED=0

# stage NAME LIMIT_S CMD...: runs CMD under a time limit unless the deadline would pass first.
stage() {
  local name=$1 limit=$2
  shift 2
  local now left code t0
  now=$(date +%s)
  left=$((DEADLINE_S - (now - START)))
  if ((left < limit / 2)); then
    echo "| $name | 0 | SKIP (${left}s left of the ${DEADLINE_S}s deadline) |" >>"$SUMMARY"
    FAILED=1
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$LOG" 2>&1
  code=$?
  local took=$(($(date +%s) - t0)) verdict=ok
  if ((code == 124 || code == 137)); then
    verdict="FAIL (timed out after ${limit}s)"
  elif ((code != 0)); then
    verdict="FAIL (exit $code; see stages.log)"
  fi
  [[ $verdict == ok ]] || FAILED=1
  echo "=== $name: $verdict in ${took}s" | tee -a "$LOG"
  echo "| $name | $took | $verdict |" >>"$SUMMARY"
}

# The wheels the machine lacks (megatron-core, hydra, omegaconf, antlr4, liger) into /tmp/site.
if [[ -z $DRY_RUN ]] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; FAILED=1; }
  export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  [[ -n $DRY_RUN ]] || echo "no .whl/ here: run benchmarks/gpu/fetch_wheels.sh first, or have the packages installed" | tee -a "$LOG"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

CARD=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
  head -1)
CARD=${CARD:-"no GPU (nvidia-smi found none)"}
VERSIONS=$("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")' 2>&1)
echo "card: $CARD; $VERSIONS" | tee -a "$LOG"

build() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . &&
    "$PY" -c 'import sys, megatron_ext.ops as o; print("backend:", o.backend()); sys.exit(o.backend() != "cuda")'
}
py() { "$PY" -m "$@" --out "$TABLES" ${DRY_RUN:+--dry-run}; }
export -f build py
export PY TABLES DRY_RUN

if [[ -z $DRY_RUN ]]; then
  stage "build: pip install -e . (CUDA extension)" 240 build
  stage "compile check: csrc/check_cuda.sh" 60 env PYTHON="$PY" bash csrc/check_cuda.sh
fi
stage "kernels vs PyTorch (fp32, bf16, odd shapes)" 90 py benchmarks.gpu.kernels
stage "SFT + GRPO smoke (NCCL, world 1)" 200 py benchmarks.gpu.smoke --run-root "$WORK/smoke"
stage "MFU, 1b preset, seq 4096, 20 steps" 180 py benchmarks.gpu.mfu --run-dir "$WORK/mfu"
stage "loss: fused vs megatron vs Liger, n=16K V=128K" 120 py benchmarks.gpu.loss
stage "attention backends: parity and TFLOPS 8K-64K" 150 py benchmarks.gpu.attention
stage "decode: CUDA graphs vs eager (greedy, same weights, batch 1/16/128)" 90 py benchmarks.gpu.graphs
stage "generation engines: ours vs megatron's (greedy, same weights)" 90 py benchmarks.gpu.engines

RESULTS="$ROOT/docs/results_gpu.md"
[[ -z $DRY_RUN ]] || RESULTS="$OUT/results_gpu.md"  # a CPU rehearsal leaves docs/ alone
{
  echo "# GPU check (benchmarks/gpu/check.sh)"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC') on $CARD; $VERSIONS; $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')."
  echo "Total $(($(date +%s) - START)) s of a ${DEADLINE_S} s deadline."
  echo
  cat "$SUMMARY"
  echo
  cat "$TABLES"
} >"$RESULTS"
[[ $RESULTS == "$OUT/results_gpu.md" ]] || cp "$RESULTS" "$OUT/results_gpu.md"
cat "$RESULTS"
rm -rf "$WORK"
exit "$FAILED"
