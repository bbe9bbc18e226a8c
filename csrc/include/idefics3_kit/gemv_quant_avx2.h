// The AVX2 path of gemv_quant.h (included by it after its portable part, whose Act, Job and kBlock
// it uses; x86-64 with GCC or clang only): CPUs with AVX2
// and FMA but without AVX-512 VNNI (AMD Zen 2 / Zen 3, Intel before Ice Lake, Alder Lake's
// E-cores). Without it they ran the portable loop, which made an int4 decode step ~3.5x slower
// than bf16 on a Zen 3 (6.6 vs 23.9 tokens/s, benchmarks/quant.py), the opposite of the point.
//
// Same contract as the AVX-512 path: the Act buffers prepare() fills, integer products summed
// exactly per 32-column activation block, scaled in fp32, one bf16 rounding per output. The
// products come from vpmaddubsw (unsigned x signed bytes, adjacent pairs summed to int16):
//   int8: |xq| * (w with xq's sign) (vpsignb), so no pair sum passes 2 * 127 * 127 < 2^15 (w is
//         in [-127, 127], ops/quant.py), then pairs of pairs to int32 (vpmaddwd by ones);
//   int4: the unsigned nibble u = q + 8 times xq (2 * 15 * 127 per pair), the even and odd
//         columns' pair sums added in int16, then to int32, on top of init4 (-8 * sum xq),
//         which leaves sum q * xq exactly, as block4 of the AVX-512 path does.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx2_math.h"

#ifndef IK_UNROLL
#define IK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace idefics3_kit {
namespace qgemv {
namespace avx2 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

using avx2_math::hsum;

// bf16 bits (uint16) -> fp32
inline float bf16f(uint16_t b) { return bf16_bits_to_float(b); }

// 32 bytes of a weight row from p, of which only `bytes` (< 32 at a row's end) are real: the rest
// read as zeros, so no load passes the row (the last row ends the allocation).
IK_AVX2_FN inline __m256i load_w(const uint8_t* p, int64_t bytes) {
  if (bytes >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) uint8_t tmp[32] = {};
  std::memcpy(tmp, p, static_cast<size_t>(bytes));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
}

// 32 bytes of weights at p: kPartial (a row's last step) reads only `bytes` of them (load_w);
// every other step loads them as they are (checking each load cost 5% of the int4 kernel).
template <bool kPartial>
IK_AVX2_FN IK_ALWAYS_INLINE __m256i load_step(const uint8_t* p, int64_t bytes) {
  if constexpr (kPartial) return load_w(p, bytes);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// One 32-column step (one activation block) of block8 at column c.
template <int M, int R, bool kPartial>
IK_AVX2_FN IK_ALWAYS_INLINE void step8(const Act& a, int64_t m0, const uint8_t* w, int64_t c, int64_t ahead,
                                       __m256* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i xq[M], xabs[M];
  __m256 xs[M];
  IK_UNROLL
  for (int m = 0; m < M; ++m) {
    xq[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.xq + (m0 + m) * a.kpad + c));
    xabs[m] = _mm256_sign_epi8(xq[m], xq[m]);
    xs[m] = _mm256_broadcast_ss(a.xs + (m0 + m) * (a.kpad / kBlock) + c / kBlock);
  }
  IK_UNROLL
  for (int q = 0; q < R; ++q) {
    // without it the loads of rows 2-4 of a block waited on memory (perf: ~65% of the kernel's
    // samples on their first use)
    _mm_prefetch(reinterpret_cast<const char*>(w + q * a.k + c + ahead), _MM_HINT_T0);
    const __m256i wv = load_step<kPartial>(w + q * a.k + c, a.k - c);  // past k: zero bytes against zero xq
    IK_UNROLL
    for (int m = 0; m < M; ++m) {
      const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(xabs[m], _mm256_sign_epi8(wv, xq[m])), ones);
      acc[m * R + q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xs[m], acc[m * R + q]);
    }
  }
}

// int8: M rows of x against R weight rows, 32 columns (one activation block) per step.
template <int M, int R>
IK_AVX2_FN void block8(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  __m256 acc[M * R];
  for (int i = 0; i < M * R; ++i) acc[i] = _mm256_setzero_ps();
  const uint8_t* w = j.w + r * a.k;
  const int64_t ahead = prefetch_rows(a.k, R) * a.k;
  int64_t c = 0;
  for (; c + kBlock <= a.k; c += kBlock) step8<M, R, false>(a, m0, w, c, ahead, acc);
  if (c < a.k) step8<M, R, true>(a, m0, w, c, ahead, acc);
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) sums[m * R + q] = hsum(acc[m * R + q]) * bf16f(j.scales[r + q]);
}

// int4: 64 columns (32 bytes) per step, in the halves of gemv_quant.h's 128-column layout: the
// bytes of columns c .. c + 63 hold the even columns in their low nibbles (xeo's first 64 of the
// 128, from (c mod 128) / 2) and the odd ones in their high nibbles (xeo's second 64). Lane i of
// the int32 result covers columns c + 8i .. c + 8i + 7: lanes 0-3 one activation block, 4-7 the
// next; xs4 holds those blocks' scales per lane, the weight groups' scales are put beside them.
// kWideGroups (groups of 64 or 128): a step lies in one group, so its scale is one broadcast
// instead of two lanes' worth (3% of the kernel's time on a Zen 3).
template <int M, int R, bool kWideGroups, bool kPartial>
IK_AVX2_FN IK_ALWAYS_INLINE void step4(const Act& a, const Job& j, int64_t m0, const uint8_t* w, const uint16_t* s,
                                       int64_t c, int64_t ahead, __m256* acc) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t row_bytes = a.k / 2, groups = a.k / j.group;
  const int gshift = j.group == 32 ? 5 : j.group == 64 ? 6 : 7;
  const int64_t base = c / 128 * 128, half = (c % 128) / 2;  // this step's evens: xeo[base + half ..]
  __m256i xe[M], xo[M], init[M];
  __m256 xs[M];
  IK_UNROLL
  for (int m = 0; m < M; ++m) {
    const int8_t* e = a.xeo + (m0 + m) * a.kpad + base + half;
    xe[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e));
    xo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 64));
    init[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.init4 + (m0 + m) * (a.kpad / 8) + c / 8));
    xs[m] = _mm256_loadu_ps(a.xs4 + (m0 + m) * (a.kpad / 8) + c / 8);
  }
  const int64_t g0 = c >> gshift;
  IK_UNROLL
  for (int q = 0; q < R; ++q) {
    _mm_prefetch(reinterpret_cast<const char*>(w + q * row_bytes + c / 2 + ahead), _MM_HINT_T0);
    const __m256i v = load_step<kPartial>(w + q * row_bytes + c / 2, row_bytes - c / 2);
    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    __m256 ws;
    if constexpr (kWideGroups) {
      ws = _mm256_set1_ps(bf16f(s[q * groups + g0]));
    } else {
      const __m256i halves = _mm256_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0);  // lanes 0-3: first scale, 4-7: second
      const __m256i top = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      const int64_t g1 = std::min(groups - 1, (c + 32) >> gshift);  // past k: an unused scale
      const uint32_t pair = s[q * groups + g0] | static_cast<uint32_t>(s[q * groups + g1]) << 16;
      ws = _mm256_castsi256_ps(_mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(pair)), halves), top));
    }
    IK_UNROLL
    for (int m = 0; m < M; ++m) {
      const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[m]), _mm256_maddubs_epi16(hi, xo[m]));
      const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(p, ones), init[m]);
      acc[m * R + q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(xs[m], ws), acc[m * R + q]);
    }
  }
}

template <int M, int R, bool kWideGroups>
IK_AVX2_FN void block4(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  const int64_t row_bytes = a.k / 2;
  __m256 acc[M * R];
  for (int i = 0; i < M * R; ++i) acc[i] = _mm256_setzero_ps();
  const uint8_t* w = j.w + r * row_bytes;
  const uint16_t* s = j.scales + r * (a.k / j.group);
  const int64_t ahead = prefetch_rows(row_bytes, R) * row_bytes;
  int64_t c = 0;
  for (; c + 64 <= a.k; c += 64) step4<M, R, kWideGroups, false>(a, j, m0, w, s, c, ahead, acc);
  if (c < a.k) step4<M, R, kWideGroups, true>(a, j, m0, w, s, c, ahead, acc);  // the last 32 columns
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) sums[m * R + q] = hsum(acc[m * R + q]);
}

// Register blocks of one weight format. One x row against one int8 weight row at a time: with four
// rows interleaved the int8 GEMV read 18 GB/s on a Zen 3 (2 threads, the decoder's weights), with
// one 24 GB/s (the prefetchers follow one stream per thread better, and a row's step has little to
// share). int4 keeps four for short rows: unpacking its nibbles is its bottleneck there, and one
// row read 14 GB/s against 19 (benchmarks/gemv_kernels.cpp times the kernels as shipped). From
// kLongInt4Row columns on it takes one: this AVX2 path run on a Zen 4 read the decoder's down_proj
// (K = 1536) at 15-16.5 GB/s with four rows and 21.5-23.3 with one (two x rows: 14-15.6 against
// 17.6-18; four: 8.9-9.2 against 9.4-9.7). Not yet measured on a Zen 3.
template <int Bits, bool LongRows = false>
struct Blocks {
  const Act& a;
  const Job& j;
  template <int M>
  static constexpr int rows_per_block() {  // accumulators + x in the 16 ymm
    return LongRows ? 1 : M == 1 ? (Bits == 8 ? 1 : 4) : M == 2 ? 2 : 1;
  }
  template <int M, int R>
  IK_AVX2_FN void run(int64_t m0, int64_t r, float* sums) const {
    if constexpr (Bits == 8)
      block8<M, R>(a, j, m0, r, sums);
    else if (j.group >= 64)
      block4<M, R, true>(a, j, m0, r, sums);
    else
      block4<M, R, false>(a, j, m0, r, sums);
  }
};

inline void rows(const Act& a, const Job& j, int64_t r0, int64_t r1) {
  const tiles::Out out{j.bias, j.y, j.y_stride};
  if (j.bits == 8)
    tiles::rows(Blocks<8>{a, j}, out, a.rows, r0, r1);
  else if (a.k >= kLongInt4Row)
    tiles::rows(Blocks<4, true>{a, j}, out, a.rows, r0, r1);
  else
    tiles::rows(Blocks<4>{a, j}, out, a.rows, r0, r1);
}

// quantize_row, 32 columns per step: the same bytes (tests/cpp/test_quant.cpp), NaN and inf
// included. The block maximum takes each |x| as max(|x|, running max), which skips a NaN as
// std::max(amax, |x|) does; vcvtps2dq rounds half to even in the default MXCSR mode, like
// round_half_even, and turns NaN into INT_MIN, which the clamp makes -127, as the portable loop.
IK_AVX2_FN inline void quantize_row(const uint16_t* x, int64_t k, int8_t* xq, float* xs) {
  const int64_t kp = padded_k(k);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lim = _mm256_set1_epi32(127), neg_lim = _mm256_set1_epi32(-127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs interleave 4-byte groups by lane
  for (int64_t c0 = 0; c0 < kp; c0 += kBlock) {
    const int64_t n = std::clamp<int64_t>(k - c0, 0, kBlock);
    alignas(32) uint16_t tail[kBlock] = {};
    const uint16_t* src = x + c0;
    if (n < kBlock) {  // the row's end: the rest reads as zeros (columns past k quantize to 0)
      std::memcpy(tail, src, static_cast<size_t>(n) * 2);
      src = tail;
    }
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * i));
      v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      amax = _mm256_max_ps(_mm256_and_ps(v[i], abs_mask), amax);  // (a NaN |x| loses: the second operand wins)
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float block_max = _mm_cvtss_f32(m4);
    const __m256 inv = _mm256_set1_ps(block_max > 0.0f ? 127.0f / block_max : 0.0f);
    xs[c0 / kBlock] = block_max / 127.0f;
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)), lim), neg_lim);
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + c0), _mm256_permutevar8x32_epi32(packed, order));
  }
}

// prepare_rows with the vector quantize_row.
inline void prepare(const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride, int8_t* xq, float* xs, int8_t* xeo,
                    int32_t* init8, int32_t* init4, float* xs8, float* xs4) {
  prepare_rows(quantize_row, x, rows, k, x_stride, xq, xs, xeo, init8, init4, xs8, xs4);
}

// 8 fp32 -> 8 bf16 bits rounded to nearest even (finite values: the products q * s are).
IK_AVX2_FN inline __m256i round_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

// 16 fp32 (a, b) -> 16 bf16 stored at o
IK_AVX2_FN inline void store_bf16x16(uint16_t* o, __m256 a, __m256 b) {
  const __m256i packed = _mm256_packus_epi32(round_bf16(a), round_bf16(b));  // a0-3 b0-3 | a4-7 b4-7
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}

// dequant_portable, 16 (int8) or 32 (int4) columns per step; the tail of an int8 row scalar.
IK_AVX2_FN inline void dequant(const Job& j, int64_t k, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* o = out + r * k;
    if (j.bits == 8) {
      const float sf = bf16f(j.scales[r]);
      const __m256 s = _mm256_set1_ps(sf);
      const int8_t* w = reinterpret_cast<const int8_t*>(j.w) + r * k;
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i));
        const __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        const __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
        store_bf16x16(o + i, _mm256_mul_ps(v0, s), _mm256_mul_ps(v1, s));
      }
      for (; i < k; ++i) o[i] = float_to_bf16_rne(static_cast<float>(w[i]) * sf);
      continue;
    }
    const uint8_t* w = j.w + r * (k / 2);
    const int64_t groups = k / j.group;
    const __m256i low = _mm256_set1_epi32(0xF), eight = _mm256_set1_epi32(8);
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(bf16f(j.scales[r * groups + g]));
      for (int64_t i = g * j.group; i < (g + 1) * j.group; i += 16) {  // 8 bytes: columns i .. i + 15
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i / 2)));
        const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, low), eight)), s);
        const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight)), s);
        // 32-bit lane t = column 2t (low half) | column 2t + 1 (high half)
        const __m256i pairs = _mm256_or_si256(round_bf16(lo), _mm256_slli_epi32(round_bf16(hi), 16));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), pairs);
      }
    }
  }
}

}  // namespace avx2
}  // namespace qgemv
}  // namespace idefics3_kit
