#!/usr/bin/env bash
# Build the C++ tests with AddressSanitizer + UndefinedBehaviorSanitizer and run them.
#   tools/asan_check.sh [python]      (python: the interpreter whose torch to build against)
# Leak detection is off: libtorch keeps global registries alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-${PYTHON:-python3}}"
BUILD=build/asan
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Debug -DIDEFICS3_KIT_SANITIZE=ON -DPython3_EXECUTABLE="$PY" >/dev/null
cmake --build "$BUILD" -j"${JOBS:-1}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$BUILD" --output-on-failure
echo "asan_check: C++ tests ran clean under ASan + UBSan"
