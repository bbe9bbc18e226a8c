#!/usr/bin/env bash
# One-shot GPU validation for a short GPU loan (under 8 minutes on an H100/H200):
#
#   1. the device and the toolchain (nvidia-smi, nvcc, torch);
#   2. the standalone, torch-free self-test of the kernels (tests/cuda/host/gpu_selftest.cu),
#      built for the card's architecture, run plain and under compute-sanitizer
#      (memcheck, racecheck, synccheck, initcheck);
#   3. the extension built with the CUDA kernels (FORCE_CUDA=1, in place, for this card only);
#   4. every GPU test (tests/cuda, tests/ops, the CUDA self-check tests), then memcheck over the
#      CUDA attention and preprocessing tests;
#   5. the GPU benchmarks (preprocessing images/s, attention kernels vs SDPA);
#   6. one summary table: stage, PASS/FAIL/SKIP, seconds, the log file.
#
# Every stage has its own time limit, so one hang cannot eat the loan. Logs go to $OUT (the
# device tool brings that folder back) or to ./gpu_check_logs. Exit status: 0 when every stage
# passed or was skipped for a stated reason, 1 otherwise.
#
# Usage (from the repository root, on the GPU machine):   bash tools/gpu_check.sh
# Env: PYTHON (default python3), QUICK=1 (skip the benchmarks and the pytest memcheck),
#      ARCH (default: read from the card, e.g. 90).
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
LOGS="${OUT:-$ROOT/gpu_check_logs}"
mkdir -p "$LOGS"
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
T_ALL=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export IDEFICS3_KIT_CUDA_SELFCHECK="${IDEFICS3_KIT_CUDA_SELFCHECK:-1}"

stage() {  # name, time limit (s), command...
  local name="$1" limit="$2"; shift 2
  local log="$LOGS/${name}.log" t0=$(date +%s) status
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  if [ $rc -eq 0 ]; then status=PASS; elif [ $rc -eq 77 ]; then status=SKIP; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; else status="FAIL($rc)"; fi
  printf "%-26s %-10s %5ss  %s\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" | tee -a "$SUMMARY"
  tail -n 4 "$log" | sed 's/^/    /'
  [ "$status" = PASS ] || [ "$status" = SKIP ]
}

skip() {  # name, reason
  printf "%-26s %-10s %5ss  %s\n" "$1" SKIP 0 "$2" | tee -a "$SUMMARY"
}

# ---- 1. device ----------------------------------------------------------------------------------
stage device 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
  nvcc --version | tail -n 2; $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, \
  torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'" || { echo "no usable GPU"; exit 1; }
ARCH="${ARCH:-$($PYTHON -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(f"{a}{b}")')}"
CUDA_SOURCES="csrc/cuda/preprocess.cu csrc/cuda/attention_fwd.cu csrc/cuda/attention_fwd_hd64.cu \
csrc/cuda/attention_fwd_hd72.cu csrc/cuda/attention_fwd_hd128.cu csrc/cuda/attention_decode.cu"
BUILD_DIR="$(mktemp -d)"
trap 'rm -rf "$BUILD_DIR"' EXIT
SELFTEST="$BUILD_DIR/gpu_selftest"

# ---- 2. standalone self-test + compute-sanitizer -------------------------------------------------
fails=0
stage selftest_build 240 nvcc -std=c++17 -O2 -lineinfo -Icsrc/include -Icsrc/cuda \
  -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -o "$SELFTEST" tests/cuda/host/gpu_selftest.cu $CUDA_SOURCES \
  || fails=$((fails + 1))
if [ -x "$SELFTEST" ]; then
  stage selftest_run 60 "$SELFTEST" || fails=$((fails + 1))
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck synccheck initcheck; do
      stage "sanitizer_selftest_$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 1 "$SELFTEST" \
        || fails=$((fails + 1))
    done
  else
    skip sanitizer_selftest "compute-sanitizer not on PATH"
  fi
fi

# ---- 3. the extension ---------------------------------------------------------------------------
major="${ARCH:0:1}"; minor="${ARCH:1}"
stage extension_build 300 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${major}.${minor}" MAX_JOBS="$(nproc)" \
  "$PYTHON" setup.py build_ext --inplace || fails=$((fails + 1))

# ---- 4. GPU tests ---------------------------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -x --timeout=120)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null || PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -x)
stage gpu_tests 240 "${PYTEST[@]}" tests/cuda tests/ops -k "cuda or gpu or selfcheck" -rs || fails=$((fails + 1))
if [ "${QUICK:-0}" != 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  stage sanitizer_pytest_memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "${PYTEST[@]}" tests/cuda/test_attention_cuda.py tests/cuda/test_preprocess_cuda.py -k "not graph and not e2e" \
    || fails=$((fails + 1))
fi

# ---- 5. benchmarks ---------------------------------------------------------------------------------
if [ "${QUICK:-0}" != 1 ]; then
  stage bench_preprocess 120 "$PYTHON" benchmarks/preprocess_cuda.py --batch 32 --iters 10 || fails=$((fails + 1))
  stage bench_attention 150 "$PYTHON" benchmarks/attention_cuda.py --iters 20 || fails=$((fails + 1))
fi

# ---- 6. summary ------------------------------------------------------------------------------------
echo
echo "gpu_check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), sm_${ARCH}, \
$(( $(date +%s) - T_ALL ))s, $fails stage(s) failed"
cat "$SUMMARY"
for log in "$LOGS"/bench_*.log; do
  [ -f "$log" ] && { echo "--- $(basename "$log")"; tail -n 15 "$log"; }
done
[ "$fails" -eq 0 ]
