// What the two CPU flash-attention kernels share: the per-head arguments, the AVX-512 2^x of their
// softmax and the 16 x 16 transpose that packs K into dim pairs. vision_amx.h runs both products on
// Intel's tile unit; vision_avx512.h runs them with AVX-512 BF16 dot products (CPUs without AMX,
// e.g. AMD Zen 4). Torch-free.
#pragma once

#include <cstdint>

#include "attention_math.h"  // avx512::exp2_poly
#include "pillow_resample.h"  // IK_INTRINSICS_BEGIN

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__CUDACC__) && \
    !defined(IDEFICS3_KIT_NO_AVX512) && (__GNUC__ >= 11 || defined(__clang__))
#define IK_HAVE_FLASH_AVX512 1
#include <immintrin.h>

#define IK_FLASH_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace attn {
namespace flash {

// One (batch, head) of bf16 attention: rows of q/out `q_stride`/`o_stride` elements apart, of k/v
// `k_stride`/`v_stride` (the [N, L, H, hd] layout of the projections needs no copy).
struct Head {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  int64_t lq, lk, d;
  int64_t q_stride, k_stride, v_stride, o_stride;
  const uint8_t* keep;  // [lk] 1 = attend (null: every key)
  float scale;
  bool causal = false;  // the decoder's prefill: query i is key position lk - lq + i and sees keys up to it
};

// 2^x for x <= ~9; very negative x gives 0 (scalef), -inf gives NaN (callers mask those keys).
// A degree-3 minimax polynomial on [-0.5, 0.5]: relative error 7.5e-5, 26x below the bf16
// rounding the probabilities get next (2^-9); one FMA fewer than degree 4 per 16 scores, 2-4%
// of the AMX kernel (one thread, d = 64 / 72).
constexpr float kExp2Degree3[4] = {0.055171321434033506f, 0.24261054228172202f, 0.6932609856052558f,
                                   0.9999281093641537f};
IK_FLASH_FN inline __m512 exp2_ps(__m512 x) {
  __m512 n;
  const __m512 p = attn::avx512::exp2_poly(x, kExp2Degree3, n);
  return _mm512_scalef_ps(p, n);
}

// 16 x 16 32-bit words: rows r[0..15] in, r[j] = word j of every input row out.
IK_FLASH_FN inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]) and the next two
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + m], lane L: rows 4i .. 4i+3 of word 4L + m
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // gather lane L of the four row groups: word 4L + m
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x88), v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x88);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xDD);
    t[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    t[8 + m] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[4 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int j = 0; j < 16; ++j) r[j] = t[j];
}

// The mask of the n bf16 lanes from dim `from` that are < d (n <= 32).
inline uint32_t dim_lanes(int64_t d, int64_t from, int64_t n) {
  const int64_t valid = d - from < 0 ? 0 : (d - from > n ? n : d - from);
  return valid >= 32 ? ~uint32_t{0} : (uint32_t{1} << valid) - 1;
}

}  // namespace flash
}  // namespace attn
}  // namespace idefics3_kit

IK_INTRINSICS_END
#endif
