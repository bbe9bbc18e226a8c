// Torch-free kernel of quant_linear: a linear over a few bf16 rows (decode steps) against
// weight-only quantized weights (idefics3_kit/ops/quant.py has the format and the reference):
//   int8: w[n, k] = q[n, k] * s[n]                       (q int8 [N, K], s bf16 [N])
//   int4: w[n, k] = (nibble(n, k) - 8) * s[n, k / g]     (bytes [N, K/2]: column 2j low nibble,
//                                                         2j+1 high; s bf16 [N, K/g])
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in fp32, rounded to bf16 once.
//
// Why these loops: a decode step reads every weight once, so the bytes read set the speed. The
// quantized weights are expanded in registers and never written back. Both paths are exact up to
// fp32 summation order: int8 values convert exactly to fp32; int4 nibbles become bf16 numbers
// exactly and multiply bf16 x exactly in vdpbf16ps (see block4).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "pillow_resample.h"  // IK_ALWAYS_INLINE

namespace idefics3_kit {
namespace qgemv {

// The activations, prepared once per call and shared by every weight of it.
struct Act {
  int64_t rows, k, kpad;  // kpad: k rounded up to 64
  const float* xf;        // [rows, k] fp32 copy of x (int8 path, portable path)
  const uint16_t* xeo;    // [rows, kpad] bf16: per 64 columns, the 32 even ones then the 32 odd ones (int4 path)
  const float* xinit;     // [rows, kpad / 4]: -136 * (x[4i] + .. + x[4i+3]), the int4 path's offset (see block4)
};

// One weight: output rows [r0, r1) go to y[m * y_stride + r].
struct Job {
  const uint8_t* w;         // int8 [N, k] (bits 8) or packed [N, k/2] (bits 4)
  int bits;                 // 8 or 4
  int64_t group;            // int4 group size (a multiple of 32 dividing k)
  const uint16_t* scales;   // bf16 [N] (bits 8) or [N, k / group] (bits 4)
  const float* bias;        // [N] or nullptr
  uint16_t* y;              // bf16 output, already offset to this weight's first column
  int64_t y_stride;
};

inline int64_t padded_k(int64_t k) { return (k + 63) / 64 * 64; }

// x [rows, k] bf16 (row stride x_stride) -> act's buffers (xf: rows * k floats, xeo: rows * kpad,
// xinit: rows * kpad / 4 floats; xeo and xinit may be null when no int4 weight will use them).
inline void prepare(const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride, float* xf, uint16_t* xeo,
                    float* xinit) {
  const int64_t kpad = padded_k(k);
  for (int64_t m = 0; m < rows; ++m) {
    const uint16_t* xm = x + m * x_stride;
    for (int64_t i = 0; i < k; ++i) xf[m * k + i] = bf16_bits_to_float(xm[i]);
    if (xeo == nullptr) continue;  // only the fp32 copy wanted (int8 weights)
    for (int64_t i = 0; i < kpad / 4; ++i) {
      float sum = 0.0f;
      for (int64_t c = 4 * i; c < std::min<int64_t>(4 * i + 4, k); ++c) sum += xf[m * k + c];
      xinit[m * (kpad / 4) + i] = -136.0f * sum;
    }
    uint16_t* e = xeo + m * kpad;
    for (int64_t c = 0; c < kpad; c += 64)
      for (int64_t j = 0; j < 32; ++j) {
        e[c + j] = c + 2 * j < k ? xm[c + 2 * j] : 0;
        e[c + 32 + j] = c + 2 * j + 1 < k ? xm[c + 2 * j + 1] : 0;
      }
  }
}

inline int weight_int4(const uint8_t* row, int64_t i) {
  const uint8_t b = row[i >> 1];
  return ((i & 1) ? (b >> 4) : (b & 0xF)) - 8;
}

// Portable loop: the same sums, per group for int4 (CPUs without AVX-512 BF16).
inline void rows_portable(const Act& a, const Job& j, int64_t r0, int64_t r1) {
  for (int64_t m = 0; m < a.rows; ++m) {
    const float* xm = a.xf + m * a.k;
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.0f;
      if (j.bits == 8) {
        const int8_t* wr = reinterpret_cast<const int8_t*>(j.w) + r * a.k;
        for (int64_t i = 0; i < a.k; ++i) acc += xm[i] * static_cast<float>(wr[i]);
        acc *= bf16_bits_to_float(j.scales[r]);
      } else {
        const uint8_t* wr = j.w + r * (a.k / 2);
        const int64_t groups = a.k / j.group;
        for (int64_t g = 0; g < groups; ++g) {
          float part = 0.0f;
          for (int64_t i = g * j.group; i < (g + 1) * j.group; ++i) part += xm[i] * static_cast<float>(weight_int4(wr, i));
          acc += part * bf16_bits_to_float(j.scales[r * groups + g]);
        }
      }
      if (j.bias) acc += j.bias[r];
      j.y[m * j.y_stride + r] = float_to_bf16_rne(acc);
    }
  }
}

// Rows [r0, r1) of one quantized weight -> bf16 out [N, k] (q * s rounded once): the prefill's
// dequantize-then-GEMM.
inline void dequant_portable(const Job& j, int64_t k, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* o = out + r * k;
    if (j.bits == 8) {
      const float s = bf16_bits_to_float(j.scales[r]);
      const int8_t* w = reinterpret_cast<const int8_t*>(j.w) + r * k;
      for (int64_t i = 0; i < k; ++i) o[i] = float_to_bf16_rne(static_cast<float>(w[i]) * s);
    } else {
      const uint8_t* w = j.w + r * (k / 2);
      for (int64_t i = 0; i < k; ++i)
        o[i] = float_to_bf16_rne(static_cast<float>(weight_int4(w, i)) * bf16_bits_to_float(j.scales[r * (k / j.group) + i / j.group]));
    }
  }
}

}  // namespace qgemv
}  // namespace idefics3_kit

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(IDEFICS3_KIT_NO_AVX512)
#define IK_HAVE_GEMV_QUANT_PATH 1
#include <immintrin.h>

#define IK_QBF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace idefics3_kit {
namespace qgemv {
namespace avx512 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// int8: M rows of x against R weight rows, 16 columns per step (int8 -> int32 -> fp32, FMA).
template <int M, int R>
IK_QBF16_FN void block8(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) acc[m][q] = _mm512_setzero_ps();
  const int8_t* w = reinterpret_cast<const int8_t*>(j.w) + r * a.k;
  const float* x = a.xf + m0 * a.k;
  int64_t i = 0;
  for (; i + 16 <= a.k; i += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * a.k + i);
    for (int q = 0; q < R; ++q) {
      if ((i & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (q + 2 * R) * a.k + i), _MM_HINT_T0);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + q * a.k + i))));
      for (int m = 0; m < M; ++m) acc[m][q] = _mm512_fmadd_ps(xv[m], wv, acc[m][q]);
    }
  }
  if (i < a.k) {  // tail: masked loads read zeros past k
    const __mmask16 tail = static_cast<__mmask16>((1u << (a.k - i)) - 1);
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(tail, x + m * a.k + i);
    for (int q = 0; q < R; ++q) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail, w + q * a.k + i)));
      for (int m = 0; m < M; ++m) acc[m][q] = _mm512_fmadd_ps(xv[m], wv, acc[m][q]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) sums[m * R + q] = _mm512_reduce_add_ps(acc[m][q]) * bf16_bits_to_float(j.scales[r + q]);
}

// int4: 64 columns per step. 32 bytes -> 32 16-bit lanes; each nibble u becomes the bf16 number
// 128 + u by OR-ing in 0x4300 (exact: 7 mantissa bits), and vdpbf16ps multiplies them with the
// even / odd x columns. fp32 lane i of a step covers columns 4i..4i+3; it starts from
// -136 * (their x sum), so the lane holds sum x * (128 + u) - 136 * sum x = sum x * (u - 8)
// (the products are exact; the offset costs ~2^-17 of the lane's magnitude, far below bf16's
// rounding of the output). Lanes 0-7 belong to the step's first 32 columns and 8-15 to the next
// 32: one scale vector per step serves group 32 (two scales) and larger groups (one).
template <int M, int R>
IK_QBF16_FN void block4(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) acc[m][q] = _mm512_setzero_ps();
  const int64_t row_bytes = a.k / 2, groups = a.k / j.group;
  const uint8_t* w = j.w + r * row_bytes;
  const uint16_t* s = j.scales + r * groups;
  for (int64_t c = 0; c < a.kpad; c += 64) {
    const bool full = c + 64 <= a.k;
    __m512i xe[M], xo[M];
    __m512 init[M];
    for (int m = 0; m < M; ++m) {
      xe[m] = _mm512_loadu_si512(a.xeo + (m0 + m) * a.kpad + c);
      xo[m] = _mm512_loadu_si512(a.xeo + (m0 + m) * a.kpad + c + 32);
      init[m] = _mm512_loadu_ps(a.xinit + (m0 + m) * (a.kpad / 4) + c / 4);
    }
    for (int q = 0; q < R; ++q) {
      const uint8_t* wq = w + q * row_bytes + c / 2;
      if ((c & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(wq + 2 * R * row_bytes), _MM_HINT_T0);
      // a half chunk at the end (k % 64 == 32): the masked bytes meet zero x columns and a zero init
      const __m256i bytes = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq))
                                 : _mm256_maskz_loadu_epi8(0xFFFFu, wq);
      const __m512i v = _mm512_cvtepu8_epi16(bytes);
      const __m512i wlo = _mm512_ternarylogic_epi32(v, low, magic, 0xEA);  // (v & 0xF) | 0x4300
      const __m512i whi = _mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
      __m512 sv;
      if (j.group == 32) {
        const int64_t g = c / 32;
        const float s1 = g + 1 < groups ? bf16_bits_to_float(s[q * groups + g + 1]) : 0.0f;
        sv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(bf16_bits_to_float(s[q * groups + g])), _mm512_set1_ps(s1));
      } else {
        sv = _mm512_set1_ps(bf16_bits_to_float(s[q * groups + c / j.group]));
      }
      for (int m = 0; m < M; ++m) {
        __m512 d = _mm512_dpbf16_ps(init[m], reinterpret_cast<__m512bh>(xe[m]), reinterpret_cast<__m512bh>(wlo));
        d = _mm512_dpbf16_ps(d, reinterpret_cast<__m512bh>(xo[m]), reinterpret_cast<__m512bh>(whi));
        acc[m][q] = _mm512_fmadd_ps(d, sv, acc[m][q]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < R; ++q) sums[m * R + q] = _mm512_reduce_add_ps(acc[m][q]);
}

template <int M>
IK_QBF16_FN void rows_m(const Act& a, const Job& j, int64_t m0, int64_t r0, int64_t r1) {
  constexpr int R = 4;
  float sums[M * R];
  auto store = [&](int64_t r, int rows) {
    for (int m = 0; m < M; ++m)
      for (int q = 0; q < rows; ++q) {
        const float v = sums[m * rows + q] + (j.bias ? j.bias[r + q] : 0.0f);
        j.y[(m0 + m) * j.y_stride + r + q] = float_to_bf16_rne(v);
      }
  };
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    if (j.bits == 8) block8<M, R>(a, j, m0, r, sums); else block4<M, R>(a, j, m0, r, sums);
    store(r, R);
  }
  for (; r < r1; ++r) {
    if (j.bits == 8) block8<M, 1>(a, j, m0, r, sums); else block4<M, 1>(a, j, m0, r, sums);
    store(r, 1);
  }
}

// dequant_portable, 16 (int8) or 32 (int4) columns per step; vcvtneps2bf16 rounds to nearest
// even like float_to_bf16_rne (the products are finite and far from the subnormal range).
IK_QBF16_FN inline void dequant(const Job& j, int64_t k, uint16_t* out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* o = out + r * k;
    if (j.bits == 8) {
      const __m512 s = _mm512_set1_ps(bf16_bits_to_float(j.scales[r]));
      const int8_t* w = reinterpret_cast<const int8_t*>(j.w) + r * k;
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(v, s))));
      }
      for (; i < k; ++i) o[i] = float_to_bf16_rne(static_cast<float>(w[i]) * bf16_bits_to_float(j.scales[r]));
      continue;
    }
    const uint8_t* w = j.w + r * (k / 2);
    const int64_t groups = k / j.group;
    const __m512i low = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 s = _mm512_set1_ps(bf16_bits_to_float(j.scales[r * groups + g]));
      for (int64_t i = g * j.group; i < (g + 1) * j.group; i += 32) {  // 16 bytes: columns i .. i + 31
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i / 2)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low), eight));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
        const __m512i lo16 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(lo, s))));
        const __m512i hi16 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(hi, s))));
        // 32-bit lane j = column 2j (low half) | column 2j + 1 (high half)
        _mm512_storeu_si512(o + i, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
      }
    }
  }
}

inline void rows(const Act& a, const Job& j, int64_t r0, int64_t r1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.rows; m0 += 4) rows_m<4>(a, j, m0, r0, r1);
  switch (a.rows - m0) {
    case 3: rows_m<3>(a, j, m0, r0, r1); break;
    case 2: rows_m<2>(a, j, m0, r0, r1); break;
    case 1: rows_m<1>(a, j, m0, r0, r1); break;
    default: break;
  }
}

}  // namespace avx512
}  // namespace qgemv
}  // namespace idefics3_kit
#endif

namespace idefics3_kit {
namespace qgemv {

// Runtime ISA dispatch: AVX-512 BF16 where the CPU has it, else the portable loop.
// allow_vector = false (tests) forces the portable loop.
inline bool vectorized() {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  return avx512::available();
#else
  return false;
#endif
}

inline void run_dequant(const Job& j, int64_t k, uint16_t* out, int64_t r0, int64_t r1, bool allow_vector = true) {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  if (allow_vector && avx512::available()) return avx512::dequant(j, k, out, r0, r1);
#endif
  dequant_portable(j, k, out, r0, r1);
}

inline void run_rows(const Act& a, const Job& j, int64_t r0, int64_t r1, bool allow_vector = true) {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  if (allow_vector && avx512::available()) return avx512::rows(a, j, r0, r1);
#endif
  rows_portable(a, j, r0, r1);
}

}  // namespace qgemv
}  // namespace idefics3_kit
