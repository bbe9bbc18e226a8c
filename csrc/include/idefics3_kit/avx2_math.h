// Small AVX2 helpers shared by the AVX2 kernel paths (gemv_bf16.h, gemv_quant_avx2.h): x86-64 with
// GCC or clang only; every function carries the avx2,fma target, so the including file needs no
// global -mavx2 and the CPU is checked at run time by the caller's dispatch.
#pragma once

#include <immintrin.h>

#define IK_AVX2_FN __attribute__((target("avx2,fma")))

namespace idefics3_kit {
namespace avx2_math {

// The sum of the 8 lanes.
IK_AVX2_FN inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

}  // namespace avx2_math
}  // namespace idefics3_kit
