// Torch-free kernel of decode_linear: a bf16 linear over a few rows (a decode step has one row
// per sequence), y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in fp32, rounded to
// bf16 once.
//
// Why not oneDNN: for one row the work is reading the weight once, and at the decoder's narrow
// shapes (K = 576) oneDNN's bf16 matmul streams the weights at 14-19 GB/s on the development
// machine where this loop reaches 22-30 GB/s (benchmarks/linear_cpu.py, 30 distinct weights per
// shape as in a decode step). Weights stay in torch's plain [N, K] layout: no packed copy, and
// several weights (q|k|v, gate|up) are read in one call without concatenating them.
#pragma once

#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "gemv_tiles.h"
#include "pillow_resample.h"  // IK_ALWAYS_INLINE, IK_INTRINSICS_BEGIN

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace gemv {

// Rows [r0, r1) of one weight: outputs go to y[m * y_stride + r] for m < rows_x.
struct Job {
  const uint16_t* x;  // [rows_x, k] bf16, row stride x_stride
  int64_t rows_x, k, x_stride;
  const uint16_t* w;  // [N, k] bf16, contiguous
  const float* bias;  // [N] or nullptr
  uint16_t* y;        // bf16 output, already offset to this weight's first column
  int64_t y_stride;
};

// Portable fallback: the same sums in a plain loop (CPUs without AVX2 or AVX-512 BF16).
inline void rows_portable(const Job& j, int64_t r0, int64_t r1) {
  for (int64_t m = 0; m < j.rows_x; ++m) {
    const uint16_t* xm = j.x + m * j.x_stride;
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* wr = j.w + r * j.k;
      float acc = 0.0f;
      for (int64_t i = 0; i < j.k; ++i) acc += bf16_bits_to_float(xm[i]) * bf16_bits_to_float(wr[i]);
      if (j.bias) acc += j.bias[r];
      j.y[m * j.y_stride + r] = float_to_bf16_rne(acc);
    }
  }
}

}  // namespace gemv
}  // namespace idefics3_kit

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(IDEFICS3_KIT_NO_AVX512)
#define IK_HAVE_GEMV_BF16_PATH 1
#include <immintrin.h>

#define IK_BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace idefics3_kit {
namespace gemv {
namespace avx512bf16 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

IK_BF16_FN IK_ALWAYS_INLINE __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// M rows of x (M <= 4) against R consecutive weight rows starting at w: 32 k-values per step,
// each vdpbf16ps adding 16 pairs of products into one accumulator per (m, r).
template <int M, int R>
IK_BF16_FN void block(const Job& j, int64_t m0, const uint16_t* w, float* sums /* [M][R] */) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* x = j.x + m0 * j.x_stride;
  int64_t i = 0;
  for (; i + 32 <= j.k; i += 32) {
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(x + m * j.x_stride + i);
    for (int r = 0; r < R; ++r) {
      // Two blocks ahead: the hardware prefetchers lose track of R interleaved row streams when
      // rows are short (K = 576: 3x the bandwidth from L3 with this line, measured).
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * j.k + i), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(w + r * j.k + i);
      for (int m = 0; m < M; ++m) acc[m][r] = dot_pairs(acc[m][r], xv[m], wv);
    }
  }
  if (i < j.k) {  // tail: masked loads read zeros past k (0 * 0 adds nothing)
    const __mmask32 tail = static_cast<__mmask32>((uint64_t{1} << (j.k - i)) - 1);
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(tail, x + m * j.x_stride + i);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(tail, w + r * j.k + i);
      for (int m = 0; m < M; ++m) acc[m][r] = dot_pairs(acc[m][r], xv[m], wv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// One weight row at a time for any number of x rows: on a Zen 4 (the decoder's weights, one x
// row) 31 GB/s on 2 threads and 20 on one, against 23 and 12 for four interleaved rows. With two
// and four x rows too (benchmarks/gemv_kernels.cpp, 2 threads, four interleaved runs of each
// build): a pass over the weights with two x rows 9.6-11.6 ms (median 10.0) against 11.0-13.4
// (11.5) for four weight rows at a time, with four x rows 10.7-11.5 against 12.2-12.7. The Intel
// machines the four-row blocks were tuned on have not been measured with this.
struct Blocks {
  const Job& j;
  template <int M>
  static constexpr int rows_per_block() { return 1; }
  template <int M, int R>
  IK_BF16_FN void run(int64_t m0, int64_t r, float* sums) const { block<M, R>(j, m0, j.w + r * j.k, sums); }
};

// Weight rows [r0, r1) for every row of x (gemv_tiles.h).
inline void rows(const Job& j, int64_t r0, int64_t r1) {
  tiles::rows(Blocks{j}, tiles::Out{j.bias, j.y, j.y_stride}, j.rows_x, r0, r1);
}

}  // namespace avx512bf16
}  // namespace gemv
}  // namespace idefics3_kit
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define IK_HAVE_GEMV_BF16_AVX2 1
#include <immintrin.h>

#include "avx2_math.h"


namespace idefics3_kit {
namespace gemv {
// AVX2 + FMA (AMD Zen 2 / Zen 3, Intel before Cooper Lake): no bf16 dot-product instruction, so
// each 16 bf16 values become fp32 in two registers, the even ones (shifted into the high halves)
// and the odd ones (low halves masked off); x and w are split alike, so the products pair up.
// Without this path such CPUs ran torch's bf16 F.linear, ~15 GB/s where this reads at the
// memory's speed, and the one-call decode step (decode_layers), which needs it, did not apply.
namespace avx2 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

IK_AVX2_FN IK_ALWAYS_INLINE __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
IK_AVX2_FN IK_ALWAYS_INLINE __m256 odd_f32(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

using avx2_math::hsum;

// M rows of x against R consecutive weight rows starting at w, 16 k-values per step; the tail
// (k not a multiple of 16) in scalar fp32 on top of the vector sums.
template <int M, int R>
IK_AVX2_FN void block(const Job& j, int64_t m0, const uint16_t* w, float* sums /* [M][R] */) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint16_t* x = j.x + m0 * j.x_stride;
  int64_t i = 0;
  for (; i + 16 <= j.k; i += 16) {
    __m256 xe[M], xo[M];
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * j.x_stride + i));
      xe[m] = even_f32(xv);
      xo[m] = odd_f32(xv);
    }
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + 2 * R) * j.k + i), _MM_HINT_T0);  // as the AVX-512 path
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * j.k + i));
      const __m256 we = even_f32(wv), wo = odd_f32(wv);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(xo[m], wo, _mm256_fmadd_ps(xe[m], we, acc[m][r]));
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = i; t < j.k; ++t) s += bf16_bits_to_float(x[m * j.x_stride + t]) * bf16_bits_to_float(w[r * j.k + t]);
      sums[m * R + r] = s;
    }
}

// One x row against one weight row at a time: 23.5 vs 21.6 GB/s for four interleaved rows on a
// Zen 3 (2 threads, the decoder's weights; the prefetchers follow one stream per thread better;
// benchmarks/gemv_kernels.cpp times the kernels as shipped); two x rows gained nothing from it.
struct Blocks {
  const Job& j;
  template <int M>
  static constexpr int rows_per_block() { return M == 1 ? 1 : M == 2 ? 4 : 2; }  // M x R accumulators + 2M x in 16 ymm
  template <int M, int R>
  IK_AVX2_FN void run(int64_t m0, int64_t r, float* sums) const { block<M, R>(j, m0, j.w + r * j.k, sums); }
};

inline void rows(const Job& j, int64_t r0, int64_t r1) {
  tiles::rows(Blocks{j}, tiles::Out{j.bias, j.y, j.y_stride}, j.rows_x, r0, r1);
}

}  // namespace avx2
}  // namespace gemv
}  // namespace idefics3_kit
#endif

namespace idefics3_kit {
namespace gemv {

inline bool avx512_path() {
#ifdef IK_HAVE_GEMV_BF16_PATH
  return avx512bf16::available();
#else
  return false;
#endif
}

inline bool avx2_path() {
#ifdef IK_HAVE_GEMV_BF16_AVX2
  return avx2::available();
#else
  return false;
#endif
}

// True when a vectorized path runs (the portable loop is much slower than oneDNN).
inline bool fast_path() { return avx512_path() || avx2_path(); }

// AVX-512 BF16 where the CPU has it, else AVX2 + FMA, else the portable loop; allow_avx512 =
// false (tests) picks the AVX2 path on a CPU that has both.
inline void run_rows(const Job& j, int64_t r0, int64_t r1, bool allow_avx512 = true) {
#ifdef IK_HAVE_GEMV_BF16_PATH
  if (allow_avx512 && avx512bf16::available()) return avx512bf16::rows(j, r0, r1);
#endif
#ifdef IK_HAVE_GEMV_BF16_AVX2
  if (avx2::available()) return avx2::rows(j, r0, r1);
#endif
  rows_portable(j, r0, r1);
}

}  // namespace gemv
}  // namespace idefics3_kit

IK_INTRINSICS_END
