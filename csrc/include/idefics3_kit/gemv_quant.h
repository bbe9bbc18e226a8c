// Torch-free kernel of quant_linear: a linear over a few bf16 rows (decode steps) against
// weight-only quantized weights (idefics3_kit/ops/quant.py has the format and the reference):
//   int8: w[n, k] = q[n, k] * s[n]                       (q int8 [N, K], s bf16 [N])
//   int4: w[n, k] = (nibble(n, k) - 8) * s[n, k / g]     (bytes [N, K/2]: column 2j low nibble,
//                                                         2j+1 high; s bf16 [N, K/g])
// The activations are quantized too, per row and per block of 32 columns (llama.cpp's q8_0):
//   xq[m, c] = round_half_even(x[m, c] * 127 / amax_b),  xs[m, b] = amax_b / 127,
// so y[m, n] = sum_b xs[m, b] * sum_{c in b} xq[m, c] * w[n, c] (+ bias[n]): integer products
// summed exactly in int32, scaled and accumulated in fp32, rounded to bf16 once.
//
// Why: a decode step reads every weight once, so the bytes read set the speed, and expanding
// each weight byte to fp32 (or bf16) costs more instructions than the memory system needs to
// deliver it. With int8 activations one VNNI vpdpbusd multiplies 64 weight bytes by 64 x bytes
// and sums them in fours: ~4 instructions per 64 int8 weights (~6 per 128 int4 weights) instead
// of ~12, which keeps the kernel at the memory's speed on two cores.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bf16.h"
#include "gemv_tiles.h"
#include "pillow_resample.h"  // IK_ALWAYS_INLINE, IK_INTRINSICS_BEGIN

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace qgemv {

constexpr int64_t kBlock = 32;  // columns per activation scale

// The activations, prepared once per call and shared by every weight of it (prepare()).
struct Act {
  int64_t rows, k, kpad;  // kpad: k rounded up to 128 (one int4 step, two int8 steps)
  const int8_t* xq;       // [rows, kpad] x quantized, natural column order, zeros past k
  const float* xs;        // [rows, kpad / 32] the blocks' scales (0 for an all-zero block)
  const int8_t* xeo;      // [rows, kpad] per 128 columns: the 64 even ones, then the 64 odd ones (int4)
  const int32_t* init8;   // [rows, kpad / 4]: -128 * (sum of xq over columns 4i .. 4i+3) (int8, see block8)
  const int32_t* init4;   // [rows, kpad / 8]: -8 * (sum of xq over columns 8i .. 8i+7) (int4, see block4)
  const float* xs8;       // [rows, kpad / 64, 16]: per 64-column step, lane l's block scale (c + 4l) / 32
  const float* xs4;       // [rows, kpad / 128, 16]: per 128-column step, lane l's block scale (c + 8l) / 32
};

// One weight: output rows [r0, r1) go to y[m * y_stride + r].
struct Job {
  const uint8_t* w;         // int8 [N, k] (bits 8) or packed [N, k/2] (bits 4)
  int bits;                 // 8 or 4
  int64_t group;            // int4 group size: 32, 64 or 128, dividing k (quant_linear checks it)
  const uint16_t* scales;   // bf16 [N] (bits 8) or [N, k / group] (bits 4)
  const float* bias;        // [N] or nullptr
  uint16_t* y;              // bf16 output, already offset to this weight's first column
  int64_t y_stride;
};

inline int64_t padded_k(int64_t k) { return (k + 127) / 128 * 128; }

// How many weight rows ahead a vector path's step prefetches: at least two blocks of R (the
// hardware prefetchers lose track of R interleaved short row streams) and at least
// kPrefetchBytes, since quantized rows are short (288 bytes for int4 at K = 576). Distances from
// 2 to 16 KiB measured alike on an AVX-512 machine (weights in a large L3); 32 KiB was slower.
constexpr int64_t kPrefetchBytes = 4096;
inline int64_t prefetch_rows(int64_t row_bytes, int64_t r) {
  return std::max<int64_t>(2 * r, (kPrefetchBytes + row_bytes - 1) / row_bytes);
}

// From this many columns on, the int4 vector paths read one weight row at a time instead of four
// interleaved ones: four interleaved long rows defeat the hardware prefetchers (each path's
// Blocks says what it measured).
constexpr int64_t kLongInt4Row = 1024;

// Sizes of the buffers prepare() fills, in elements (the caller owns them).
struct ActSizes {
  int64_t xq, xs, xeo, init8, init4, xs8, xs4;
};
inline ActSizes act_sizes(int64_t rows, int64_t k) {
  const int64_t kp = padded_k(k);
  return {rows * kp, rows * kp / kBlock, rows * kp, rows * kp / 4, rows * kp / 8, rows * kp / 4, rows * kp / 8};
}

// Round half to even for |v| < 2^22: adding and subtracting 1.5 * 2^23 leaves v rounded to an
// integer by the FPU's default mode (what torch.round does), with no libm call (std::nearbyint
// is one on baseline x86-64, and it cost more than the whole quantization).
#if defined(__FAST_MATH__)
#error "gemv_quant.h needs IEEE float semantics: -ffast-math would fold round_half_even to the identity"
#endif
inline float round_half_even(float v) {
  constexpr float magic = 12582912.0f;
  return (v + magic) - magic;
}

// One block's quantization, as the reference (ops/quant.py quantize_activations) computes it in
// float32: inv = 127 / amax, q = round_half_even(x * inv); |x * inv| <= 127 up to one rounding, so
// the clamp never changes a value the reference keeps.
inline void quantize_row(const uint16_t* x, int64_t k, int8_t* xq, float* xs) {
  const int64_t kp = padded_k(k);
  for (int64_t c0 = 0; c0 < kp; c0 += kBlock) {
    const int64_t c1 = std::min(c0 + kBlock, k);
    float amax = 0.0f;
    for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(bf16_bits_to_float(x[c])));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    xs[c0 / kBlock] = amax / 127.0f;
    for (int64_t c = c0; c < c0 + kBlock; ++c) {
      const float v = c < c1 ? round_half_even(bf16_bits_to_float(x[c]) * inv) : 0.0f;
      xq[c] = static_cast<int8_t>(v >= -127.0f ? std::min(v, 127.0f) : -127.0f);  // NaN (from inf x) -> -127, as the vector path
    }
  }
}

// The int8 forms (init8, xs8) and the int4 forms (xeo, init4, xs4) of row m from its quantized
// values q [kp] and block scales s [kp / 32], each only when given (null: no weight of that kind
// in the call). Shared by every prepare path after its own quantize_row (a few % of its time).
inline void derive_forms(const int8_t* q, const float* s, int64_t kp, int64_t m, int8_t* xeo, int32_t* init8,
                         int32_t* init4, float* xs8, float* xs4) {
  if (init8 != nullptr) {
    for (int64_t i = 0; i < kp / 4; ++i) init8[m * (kp / 4) + i] = -128 * (q[4 * i] + q[4 * i + 1] + q[4 * i + 2] + q[4 * i + 3]);
    for (int64_t c = 0; c < kp; c += 64)
      for (int64_t l = 0; l < 16; ++l) xs8[m * (kp / 4) + c / 4 + l] = s[(c + 4 * l) / kBlock];
  }
  if (xeo == nullptr) return;
  for (int64_t i = 0; i < kp / 8; ++i) {
    int32_t sum = 0;
    for (int64_t c = 8 * i; c < 8 * i + 8; ++c) sum += q[c];
    init4[m * (kp / 8) + i] = -8 * sum;
  }
  for (int64_t c = 0; c < kp; c += 128)
    for (int64_t j = 0; j < 64; ++j) {
      xeo[m * kp + c + j] = q[c + 2 * j];
      xeo[m * kp + c + 64 + j] = q[c + 2 * j + 1];
    }
  for (int64_t c = 0; c < kp; c += 128)
    for (int64_t l = 0; l < 16; ++l) xs4[m * (kp / 8) + c / 8 + l] = s[(c + 8 * l) / kBlock];
}

// x [rows, k] bf16 (row stride x_stride) -> act's buffers (sizes: act_sizes(rows, k)), each row
// quantized by `quantize` (a path's quantize_row) and then given its forms. xq and xs are always
// filled; the int8 forms (init8, xs8) and the int4 forms (xeo, init4, xs4) only when given (null:
// no weight of that kind in the call).
using QuantizeRow = void (*)(const uint16_t* x, int64_t k, int8_t* xq, float* xs);
inline void prepare_rows(QuantizeRow quantize, const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride,
                         int8_t* xq, float* xs, int8_t* xeo, int32_t* init8, int32_t* init4, float* xs8, float* xs4) {
  const int64_t kp = padded_k(k);
  for (int64_t m = 0; m < rows; ++m) {
    quantize(x + m * x_stride, k, xq + m * kp, xs + m * (kp / kBlock));
    derive_forms(xq + m * kp, xs + m * (kp / kBlock), kp, m, xeo, init8, init4, xs8, xs4);
  }
}

// prepare_rows with the portable quantize_row (the reference bytes every vector path matches).
inline void prepare_portable(const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride, int8_t* xq, float* xs,
                             int8_t* xeo, int32_t* init8, int32_t* init4, float* xs8, float* xs4) {
  prepare_rows(quantize_row, x, rows, k, x_stride, xq, xs, xeo, init8, init4, xs8, xs4);
}

inline int weight_int4(const uint8_t* row, int64_t i) {
  const uint8_t b = row[i >> 1];
  return ((i & 1) ? (b >> 4) : (b & 0xF)) - 8;
}

// Portable loop: the same integer sums per block of 32 columns (CPUs without AVX-512 VNNI).
inline void rows_portable(const Act& a, const Job& j, int64_t r0, int64_t r1) {
  const int64_t blocks = (a.k + kBlock - 1) / kBlock;
  for (int64_t m = 0; m < a.rows; ++m) {
    const int8_t* xm = a.xq + m * a.kpad;
    const float* sm = a.xs + m * (a.kpad / kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        const int64_t c1 = std::min((b + 1) * kBlock, a.k);
        if (j.bits == 8) {
          const int8_t* wr = reinterpret_cast<const int8_t*>(j.w) + r * a.k;
          for (int64_t c = b * kBlock; c < c1; ++c) dot += xm[c] * wr[c];
          acc += static_cast<float>(dot) * sm[b];
        } else {
          const uint8_t* wr = j.w + r * (a.k / 2);
          for (int64_t c = b * kBlock; c < c1; ++c) dot += xm[c] * weight_int4(wr, c);
          acc += static_cast<float>(dot) * sm[b] * bf16_bits_to_float(j.scales[r * (a.k / j.group) + b * kBlock / j.group]);
        }
      }
      if (j.bits == 8) acc *= bf16_bits_to_float(j.scales[r]);
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

#define IK_UNROLL _Pragma("GCC unroll 16")
#define IK_QBF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")))

namespace idefics3_kit {
namespace qgemv {
namespace avx512 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

// Lanes 0..3: the sums of the 16 lanes of a0, a1, a2 and a3 (one transposing pass, 13
// instructions, instead of four separate reductions).
IK_QBF16_FN inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  // per 128-bit lane: (a0[0]+a0[2], a1[0]+a1[2], a0[1]+a0[3], a1[1]+a1[3]), the same for a2, a3
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  // per 128-bit lane: (a0, a1, a2, a3) each summed over the lane's four floats
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(u), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

// sums[m][q] = the sum of acc[m * R + q]'s lanes, for the M x R accumulators of a block.
template <int M, int R>
IK_QBF16_FN inline void reduce_rows(const __m512* acc, float* sums) {
  IK_UNROLL
  for (int m = 0; m < M; ++m) {
    if constexpr (R == 4) {
      _mm_storeu_ps(sums + m * R, reduce4(acc[m * R], acc[m * R + 1], acc[m * R + 2], acc[m * R + 3]));
    } else {
      IK_UNROLL
      for (int q = 0; q < R; ++q) sums[m * R + q] = _mm512_reduce_add_ps(acc[m * R + q]);
    }
  }
}

// int8: M rows of x against R weight rows, 64 columns per step. The weight bytes become unsigned
// by flipping their top bit (w + 128), vpdpbusd sums four (w + 128) * xq products per int32 lane
// on top of the lane's -128 * (sum of its xq) (init8), which leaves exactly sum w * xq. Lane l of
// a step covers columns c + 4l .. c + 4l + 3, all in block (c + 4l) / 32, whose scale xs8 holds.
template <int M, int R>
IK_QBF16_FN void block8(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[M * R];
  IK_UNROLL
  for (int m = 0; m < M; ++m)
    IK_UNROLL
    for (int q = 0; q < R; ++q) acc[m * R + q] = _mm512_setzero_ps();
  const uint8_t* w = j.w + r * a.k;
  const int64_t ahead = prefetch_rows(a.k, R) * a.k;
  for (int64_t c = 0; c < a.k; c += 64) {
    // a step past k reads zero bytes (w + 128 = 128) against zero xq and a zero init: no effect
    const __mmask64 mask = c + 64 <= a.k ? ~__mmask64{0} : (__mmask64{1} << (a.k - c)) - 1;
    __m512i xq[M], init[M];
    __m512 xs[M];
    IK_UNROLL
    for (int m = 0; m < M; ++m) {
      xq[m] = _mm512_loadu_si512(a.xq + (m0 + m) * a.kpad + c);
      init[m] = _mm512_loadu_si512(a.init8 + (m0 + m) * (a.kpad / 4) + c / 4);
      xs[m] = _mm512_loadu_ps(a.xs8 + (m0 + m) * (a.kpad / 4) + c / 4);
    }
    IK_UNROLL
    for (int q = 0; q < R; ++q) {
      const uint8_t* wq = w + q * a.k + c;
      _mm_prefetch(reinterpret_cast<const char*>(wq + ahead), _MM_HINT_T0);  // one line per step
      const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wq), flip);
      IK_UNROLL
      for (int m = 0; m < M; ++m)
        acc[m * R + q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init[m], wu, xq[m])), xs[m], acc[m * R + q]);
    }
  }
  reduce_rows<M, R>(acc, sums);
  IK_UNROLL
  for (int m = 0; m < M; ++m)
    IK_UNROLL
    for (int q = 0; q < R; ++q) sums[m * R + q] *= bf16_bits_to_float(j.scales[r + q]);
}

// int4: 128 columns (64 bytes) per step. The low nibbles are the even columns and the high ones
// the odd columns, each already unsigned (q + 8), so two vpdpbusd against the even / odd xq
// (xeo) on top of -8 * (sum of the lane's xq) (init4) leave sum (u - 8) * xq exactly. Lane l
// covers columns c + 8l .. c + 8l + 7: one activation block (xs4) and one weight group, whose
// scale is picked per lane from the step's 128 / g scales by a permute.
template <int M, int R>
IK_QBF16_FN void block4(const Act& a, const Job& j, int64_t m0, int64_t r, float* sums /* [M][R] */) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t row_bytes = a.k / 2, groups = a.k / j.group, per_step = 128 / std::min<int64_t>(j.group, 128);
  const int shift = j.group == 32 ? 2 : j.group == 64 ? 3 : 4;  // lane l -> scale (8 l) / g = l >> shift
  const int gshift = shift + 3;                                    // log2(g): no division in the loop
  const __m512i pick = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), shift);
  __m512 acc[M * R];
  IK_UNROLL
  for (int m = 0; m < M; ++m)
    IK_UNROLL
    for (int q = 0; q < R; ++q) acc[m * R + q] = _mm512_setzero_ps();
  const uint8_t* w = j.w + r * row_bytes;
  const uint16_t* s = j.scales + r * groups;
  const int64_t ahead = prefetch_rows(row_bytes, R) * row_bytes;
  int64_t c = 0;
  // Whole 512-column super-steps first: the four steps' int32 lanes are summed into the 16
  // activation blocks (exact integers), so the scaling costs one convert, multiply and FMA per
  // 512 columns instead of per 128, and the 16 blocks' scales load contiguously.
  // After the pair sums below, lane 4i + t holds block 4t + i of the 512 columns: the scales are
  // picked in that order. xs by a permute per row of x; the weights' bf16 scales straight into the
  // high halves of the fp32 lanes (the low halves zeroed by the mask).
  const int bshift = gshift - 5;  // block b (32 columns) -> group b >> bshift
  const __m512i lane_block = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m512i pick_w = _mm512_slli_epi32(_mm512_srli_epi32(lane_block, bshift), 16);  // 16-bit index 2L + 1
  const __mmask32 scale_count = static_cast<__mmask32>((1u << (16 >> bshift)) - 1);
  const __m512i ones = _mm512_set1_epi16(1);
  for (; c + 512 <= a.k; c += 512) {
    __m512 xs[M];
    IK_UNROLL
    for (int m = 0; m < M; ++m) xs[m] = _mm512_permutexvar_ps(lane_block, _mm512_loadu_ps(a.xs + (m0 + m) * (a.kpad / kBlock) + c / kBlock));
    IK_UNROLL
    for (int q = 0; q < R; ++q) {
      const uint8_t* wq = w + q * row_bytes + c / 2;
      __m512i lo[4], hi[4];
      IK_UNROLL
      for (int t = 0; t < 4; ++t) {
        _mm_prefetch(reinterpret_cast<const char*>(wq + 64 * t + ahead), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wq + 64 * t);
        lo[t] = _mm512_and_si512(v, low);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      const __m512i s16 = _mm512_maskz_loadu_epi16(scale_count, s + q * groups + (c >> gshift));
      const __m512 ws = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, pick_w, s16));
      IK_UNROLL
      for (int m = 0; m < M; ++m) {
        const int8_t* xeo = a.xeo + (m0 + m) * a.kpad + c;
        const int32_t* init = a.init4 + (m0 + m) * (a.kpad / 8) + c / 8;
        __m512i d[4];
        IK_UNROLL
        for (int t = 0; t < 4; ++t)
          d[t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_loadu_si512(init + 16 * t), lo[t], _mm512_loadu_si512(xeo + 128 * t)),
                                     hi[t], _mm512_loadu_si512(xeo + 128 * t + 64));
        // |d| <= 8 columns x 8 x 127 = 8128 and a block half <= 16256: exact in int16. Packing two
        // steps and summing adjacent pairs (madd by ones) twice leaves lane 4i + t = block 4t + i.
        const __m512i h01 = _mm512_madd_epi16(_mm512_packs_epi32(d[0], d[1]), ones);
        const __m512i h23 = _mm512_madd_epi16(_mm512_packs_epi32(d[2], d[3]), ones);
        const __m512i blocks = _mm512_madd_epi16(_mm512_packs_epi32(h01, h23), ones);
        acc[m * R + q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(blocks), _mm512_mul_ps(xs[m], ws), acc[m * R + q]);
      }
    }
  }
  for (; c < a.k; c += 128) {  // the remaining 128-column steps, one at a time
    // past k (k is a multiple of 32): zero bytes meet zero xq and a zero init; absent scales are 0
    const int64_t bytes = std::min<int64_t>(64, (a.k - c) / 2);
    const __mmask64 mask = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
    const __mmask8 smask = static_cast<__mmask8>((1u << std::min<int64_t>(per_step, groups - (c >> gshift))) - 1);
    __m512i xe[M], xo[M], init[M];
    __m512 xs[M];
    IK_UNROLL
    for (int m = 0; m < M; ++m) {
      xe[m] = _mm512_loadu_si512(a.xeo + (m0 + m) * a.kpad + c);
      xo[m] = _mm512_loadu_si512(a.xeo + (m0 + m) * a.kpad + c + 64);
      init[m] = _mm512_loadu_si512(a.init4 + (m0 + m) * (a.kpad / 8) + c / 8);
      xs[m] = _mm512_loadu_ps(a.xs4 + (m0 + m) * (a.kpad / 8) + c / 8);
    }
    IK_UNROLL
    for (int q = 0; q < R; ++q) {
      const uint8_t* wq = w + q * row_bytes + c / 2;
      _mm_prefetch(reinterpret_cast<const char*>(wq + ahead), _MM_HINT_T0);  // one line per step
      const __m512i v = _mm512_maskz_loadu_epi8(mask, wq);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      const __m128i s16 = _mm_maskz_loadu_epi16(smask, s + q * groups + (c >> gshift));
      const __m512 ws = _mm512_permutexvar_ps(pick, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_zextsi128_si256(s16)), 16)));
      IK_UNROLL
      for (int m = 0; m < M; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(init[m], lo, xe[m]), hi, xo[m]);
        acc[m * R + q] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), xs[m]), ws, acc[m * R + q]);
      }
    }
  }
  reduce_rows<M, R>(acc, sums);
}

// Register blocks of one weight format, as gemv_quant_avx2.h's. One x row against one int8 weight
// row at a time: on a Zen 4 (2 threads, the decoder's weights) four interleaved rows read 18.6
// GB/s and one 28 GB/s (one thread: 10 against 20), the prefetchers following one stream per
// thread better; with two x rows one int8 row at a time also won (a pass 5.9-6.4 ms, median 6.1,
// against 6.4-7.7, median 6.6, for four in four interleaved runs), with four x rows two stay.
// int4 keeps four rows for short rows (K = 576: one row was 0-10% slower), but takes one at a
// time, for any number of x rows, from kLongInt4Row columns on: there four interleaved rows of 768
// bytes (the decoder's down_proj, K = 1536) read at 13.4-14.7 GB/s and one at 18.7-21.8 on two
// threads with one x row, 11 against 17-18 with two, 11 against 14 with four
// (benchmarks/gemv_kernels.cpp's per-projection line).
template <int Bits, bool LongRows = false>
struct Blocks {
  const Act& a;
  const Job& j;
  template <int M>
  static constexpr int rows_per_block() {  // accumulators + x registers within the 32 zmm
    return LongRows ? 1 : Bits == 8 ? (M <= 2 ? 1 : 2) : M <= 2 ? 4 : 2;
  }
  template <int M, int R>
  IK_QBF16_FN void run(int64_t m0, int64_t r, float* sums) const {
    if constexpr (Bits == 8) block8<M, R>(a, j, m0, r, sums); else block4<M, R>(a, j, m0, r, sums);
  }
};

// prepare_portable's buffers, equal byte for byte: 32 columns per block in two registers
// (vcvtps2dq rounds half to even in the default MXCSR mode, like round_half_even), the lane sums
// by vpdpbusd against ones, the even / odd split by vpmovwb.
IK_QBF16_FN inline void prepare(const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride, int8_t* xq, float* xs,
                                int8_t* xeo, int32_t* init8, int32_t* init4, float* xs8, float* xs4) {
  const int64_t kp = padded_k(k);
  const __m512i ones = _mm512_set1_epi8(1), lim = _mm512_set1_epi32(127);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i quarter = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
  for (int64_t m = 0; m < rows; ++m) {
    const uint16_t* xm = x + m * x_stride;
    int8_t* q = xq + m * kp;
    float* s = xs + m * (kp / kBlock);
    for (int64_t c0 = 0; c0 < kp; c0 += kBlock) {
      const int64_t n = std::clamp<int64_t>(k - c0, 0, kBlock);
      const __mmask32 mk = n == kBlock ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
      const __m512i raw = _mm512_maskz_loadu_epi16(mk, xm + c0);
      const __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(raw)), 16));
      const __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(raw, 1)), 16));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      s[c0 / kBlock] = amax / 127.0f;
      for (int h = 0; h < 2; ++h) {
        const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(h ? v1 : v0, inv));  // NaN -> INT_MIN -> -127
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c0 + 16 * h),
                         _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(qi, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim))));
      }
    }
    for (int64_t c = 0; c < kp; c += 128) {
      const __m512i a = _mm512_loadu_si512(q + c), b = _mm512_loadu_si512(q + c + 64);
      const __m512i sa = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, a);  // sums of 4 columns
      const __m512i sb = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, b);
      if (init8 != nullptr) {
        _mm512_storeu_si512(init8 + m * (kp / 4) + c / 4, _mm512_mullo_epi32(sa, _mm512_set1_epi32(-128)));
        _mm512_storeu_si512(init8 + m * (kp / 4) + c / 4 + 16, _mm512_mullo_epi32(sb, _mm512_set1_epi32(-128)));
        for (int64_t h = 0; h < 2; ++h)
          _mm512_storeu_ps(xs8 + m * (kp / 4) + (c + 64 * h) / 4,
                           _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[(c + 64 * h) / kBlock]), _mm512_set1_ps(s[(c + 64 * h) / kBlock + 1])));
      }
      if (xeo == nullptr) continue;
      const __m512i s8 = _mm512_add_epi32(_mm512_permutex2var_epi32(sa, even, sb), _mm512_permutex2var_epi32(sa, odd, sb));
      _mm512_storeu_si512(init4 + m * (kp / 8) + c / 8, _mm512_mullo_epi32(s8, _mm512_set1_epi32(-8)));
      int8_t* e = xeo + m * kp + c;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e), _mm512_cvtepi16_epi8(a));  // the even bytes
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + 32), _mm512_cvtepi16_epi8(b));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + 64), _mm512_cvtepi16_epi8(_mm512_srli_epi16(a, 8)));  // the odd
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(e + 96), _mm512_cvtepi16_epi8(_mm512_srli_epi16(b, 8)));
      _mm512_storeu_ps(xs4 + m * (kp / 8) + c / 8, _mm512_permutexvar_ps(quarter, _mm512_maskz_loadu_ps(0xF, s + c / kBlock)));
    }
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

// Weight rows [r0, r1) for every row of x (gemv_tiles.h).
inline void rows(const Act& a, const Job& j, int64_t r0, int64_t r1) {
  const tiles::Out out{j.bias, j.y, j.y_stride};
  if (j.bits == 8)
    tiles::rows(Blocks<8>{a, j}, out, a.rows, r0, r1);
  else if (a.k >= kLongInt4Row)
    tiles::rows(Blocks<4, true>{a, j}, out, a.rows, r0, r1);
  else
    tiles::rows(Blocks<4>{a, j}, out, a.rows, r0, r1);
}

}  // namespace avx512
}  // namespace qgemv
}  // namespace idefics3_kit
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define IK_HAVE_GEMV_QUANT_AVX2 1
#include "gemv_quant_avx2.h"
#endif

namespace idefics3_kit {
namespace qgemv {

// Runtime ISA dispatch: AVX-512 BF16 + VNNI where the CPU has it, else AVX2 + FMA, else the
// portable loop. allow_vector = false (tests) forces the portable loop, allow_avx512 = false the
// AVX2 path on a CPU that has both (tests/cpp/test_quant.cpp checks every path it can run).
inline bool avx512_path();
inline bool avx2_path();
inline bool vectorized() { return avx512_path() || avx2_path(); }

// Which vector paths this build and CPU can run (tests run each).
inline bool avx512_path() {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  return avx512::available();
#else
  return false;
#endif
}
inline bool avx2_path() {
#ifdef IK_HAVE_GEMV_QUANT_AVX2
  return avx2::available();
#else
  return false;
#endif
}

inline void run_dequant(const Job& j, int64_t k, uint16_t* out, int64_t r0, int64_t r1, bool allow_vector = true,
                        bool allow_avx512 = true) {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  if (allow_vector && allow_avx512 && avx512::available()) return avx512::dequant(j, k, out, r0, r1);
#endif
#ifdef IK_HAVE_GEMV_QUANT_AVX2
  if (allow_vector && avx2::available()) return avx2::dequant(j, k, out, r0, r1);
#endif
  dequant_portable(j, k, out, r0, r1);
}

// x [rows, k] bf16 -> act's buffers (prepare_portable's contract); the AVX-512 or AVX2 path where
// the CPU has it (the same bytes: tests/cpp/test_quant.cpp), allow_vector = false forces the
// portable one, allow_avx512 = false the AVX2 one on a CPU that has both.
inline void prepare(const uint16_t* x, int64_t rows, int64_t k, int64_t x_stride, int8_t* xq, float* xs, int8_t* xeo,
                    int32_t* init8, int32_t* init4, float* xs8, float* xs4, bool allow_vector = true,
                    bool allow_avx512 = true) {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  if (allow_vector && allow_avx512 && avx512::available())
    return avx512::prepare(x, rows, k, x_stride, xq, xs, xeo, init8, init4, xs8, xs4);
#endif
#ifdef IK_HAVE_GEMV_QUANT_AVX2
  if (allow_vector && avx2::available()) return avx2::prepare(x, rows, k, x_stride, xq, xs, xeo, init8, init4, xs8, xs4);
#endif
  prepare_portable(x, rows, k, x_stride, xq, xs, xeo, init8, init4, xs8, xs4);
}

inline void run_rows(const Act& a, const Job& j, int64_t r0, int64_t r1, bool allow_vector = true,
                     bool allow_avx512 = true) {
#ifdef IK_HAVE_GEMV_QUANT_PATH
  if (allow_vector && allow_avx512 && avx512::available()) return avx512::rows(a, j, r0, r1);
#endif
#ifdef IK_HAVE_GEMV_QUANT_AVX2
  if (allow_vector && avx2::available()) return avx2::rows(a, j, r0, r1);
#endif
  rows_portable(a, j, r0, r1);
}

}  // namespace qgemv
}  // namespace idefics3_kit

IK_INTRINSICS_END
