#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU (issue 7.2). Called from .ci/run.
#
#  1. every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (files named *_sm90a.cu: sm_90a), warnings
#     are errors (nvcc, host compiler, ptxas); then the standalone GPU self-test is linked against
#     them (it runs only on a GPU machine: see docs/cuda.md);
#  2. the torch-free host code (Pillow coefficients, preprocessing plan) with g++ -Werror, and the
#     coefficient self-test;
#  3. the thin torch bindings csrc/cuda/*_binding.cpp with g++ -fsyntax-only against the installed
#     torch headers (the CPU wheel lacks the CUDA-library headers that ATen/cuda includes:
#     tools/cuda_stubs/ stands in for them; syntax only, nothing is linked). Skipped when torch
#     cannot be imported.
#
# One line per file; exit status non-zero on any error or warning.
# Env: NVCC (default: nvcc on PATH or /usr/local/cuda/bin/nvcc), PYTHON (default: python3),
#      CXX (default: g++), CUDA_CHECK_ARCHS (default "80 90"), VERBOSE=1 (ptxas resource usage).
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"
ARCHS="${CUDA_CHECK_ARCHS:-80 90}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
fail=0
t_start=$(date +%s)

if [ ! -x "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found (set NVCC)"; exit 1
fi
CUDA_HOME_GUESS="$(cd "$(dirname "$(readlink -f "$(command -v "$NVCC")")")/.." && pwd)"
CUDA_INC=""
for d in "${CUDA_HOME:-}/include" "$CUDA_HOME_GUESS/include" /usr/local/cuda/include; do
  if [ -f "$d/cuda_runtime.h" ]; then CUDA_INC="$d"; break; fi
done

run() {  # label, command...
  local label="$1"; shift
  local t0=$(date +%s.%N) log="$TMP/log.txt"
  if "$@" >"$log" 2>&1; then
    if grep -qi "warning" "$log"; then
      printf "FAIL  %-44s (warnings)\n" "$label"; sed 's/^/      /' "$log"; fail=1; return
    fi
    printf "OK    %-44s %5.1fs\n" "$label" "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')"
    if [ "${VERBOSE:-0}" = 1 ]; then sed 's/^/      /' "$log"; fi
  else
    printf "FAIL  %-44s\n" "$label"; sed 's/^/      /' "$log"; fail=1
  fi
}

# 1. kernels
shopt -s nullglob
for cu in csrc/cuda/*.cu; do
  gencode=()
  case "$cu" in
    *_sm90a.cu) gencode=(-gencode arch=compute_90a,code=sm_90a) ;;
    *) for a in $ARCHS; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done ;;
  esac
  extra=()
  if [ "${VERBOSE:-0}" = 1 ]; then extra=(-Xptxas -v); fi
  # the -D flags are the ones torch's BuildExtension passes to nvcc (no implicit half/bf16 conversions)
  run "nvcc $cu [${ARCHS// /,}]" "$NVCC" -c -std=c++17 -O3 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror "${gencode[@]}" "${extra[@]}" \
      "$cu" -o "$TMP/$(basename "$cu").o"
done

# 1b. the standalone GPU self-test (tests/cuda/host/gpu_selftest.cu) links against those objects
objs=()
for cu in csrc/cuda/*.cu; do
  case "$cu" in *_sm90a.cu) continue ;; esac
  [ -f "$TMP/$(basename "$cu").o" ] && objs+=("$TMP/$(basename "$cu").o")
done
run "nvcc tests/cuda/host/gpu_selftest.cu (link)" "$NVCC" -std=c++17 -O2 -Werror all-warnings \
    -Xcompiler -Wall,-Wextra,-Werror -gencode arch=compute_80,code=sm_80 \
    tests/cuda/host/gpu_selftest.cu "${objs[@]}" -o "$TMP/gpu_selftest"

# 2. torch-free host code
run "g++ tests/cuda/host/resize_ref_main.cpp" "$CXX" -std=c++17 -O2 -Wall -Wextra -Werror \
    tests/cuda/host/resize_ref_main.cpp -o "$TMP/resize_ref_main"
[ -x "$TMP/resize_ref_main" ] && run "coefficient self-test" "$TMP/resize_ref_main" --selftest
run "g++ tests/cuda/host/preprocess_plan_main.cpp" "$CXX" -std=c++17 -O2 -Wall -Wextra -Werror \
    tests/cuda/host/preprocess_plan_main.cpp -o "$TMP/preprocess_plan_main"

# 3. bindings (syntax only)
TORCH_INC="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"
if [ -z "$TORCH_INC" ] || [ -z "$CUDA_INC" ]; then
  for b in csrc/cuda/*_binding.cpp; do printf "SKIP  %-44s (no torch headers or CUDA include dir)\n" "g++ -fsyntax-only $b"; done
else
  inc=()
  for p in $TORCH_INC; do inc+=(-isystem "$p"); done
  for b in csrc/cuda/*_binding.cpp; do
    run "g++ -fsyntax-only $b" "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror "${inc[@]}" \
        -isystem tools/cuda_stubs -isystem "$CUDA_INC" "$b"
  done
fi

echo "check_cuda: $([ $fail = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - t_start ))s"
exit $fail
