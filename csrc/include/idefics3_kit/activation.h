// Torch-free kernel of gelu_tanh_: transformers' "gelu_pytorch_tanh" (SigLIP's MLP activation),
//   gelu(x) = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))),
// in place over a contiguous run of float32 or bf16 values, computed in float32 and rounded once.
//
// Why: after the fc1 GEMM of a SigLIP layer, oneDNN's GELU epilogue cost 2.7-3.5 ms of a 25 ms
// [2048 x 768] @ [768 x 3072] bf16 call on a 2-core AMD Zen 4, and torch's own bf16 F.gelu 6.1 ms
// as a separate pass; this pass takes ~1 ms (benchmarks/activation.py).
//
// Written without cancellation: with y the tanh's argument and e = exp(-2|y|),
//   (1 + tanh(y)) / 2 = 1 / (1 + e) for y >= 0, and e / (1 + e) for y < 0,
// so gelu(x) = x * (y >= 0 ? 1 : e) / (1 + e): relative error ~3e-7 everywhere (exp's 1e-7 and a
// Newton-refined reciprocal), against the bf16 rounding (2^-9) that follows. Very negative x gives
// -0 as torch does (e is 0 below 2^-126), very large x gives x; NaN stays NaN, +inf gives +inf and
// -inf gives NaN, as torch's formula (x / 2 * (1 + tanh) = -inf * 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention_math.h"  // exp_neg (scalar and AVX-512), bf16 conversions
#include "bf16.h"

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace act {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// One value, the portable path (and the AVX-512 path's reference).
inline float gelu_tanh(float x) {
  const float y = kGeluC * (x + kGeluA * x * x * x);
  const float e = attn::exp_neg(-2.0f * std::fabs(y));
  const float g = x * (y >= 0.0f ? 1.0f : e) / (1.0f + e);
  // x = -inf: y = -inf, e = 0, -inf * 0 = NaN (torch: -inf / 2 * (1 + -1) = NaN); NaN: NaN
  return g;
}

IK_MULTIVERSION static void gelu_tanh_portable(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = gelu_tanh(x[i]);
}

IK_MULTIVERSION static void gelu_tanh_portable(uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = float_to_bf16_rne(gelu_tanh(bf16_bits_to_float(x[i])));
}

}  // namespace act
}  // namespace idefics3_kit

#ifdef IK_HAVE_AVX512_PATH
namespace idefics3_kit {
namespace act {
namespace avx512 {

// 2^z for z <= 0, 16 lanes: a near-minimax polynomial on the fraction and VSCALEFPS for the
// integer part. Exactly 0 below -126 (no subnormals: gelu(-inf) must be -inf * 0 = NaN, and gelu
// of a very negative x -0, as torch's), and for NaN. Degree 5 (relative error 2.3e-7 evaluated in
// float32) for bf16 outputs, whose rounding (2^-9) hides it; degree 6 (9.6e-8) for float32 ones,
// where degree 5's error alone took the GELU of small x to 3.7 ulps.
constexpr float kExp2Degree5[6] = {0.0013276470126584172f, 0.009675541892647743f, 0.05550713464617729f,
                                   0.24022120237350464f,   0.6931469440460205f,   1.0000001192092896f};
constexpr float kExp2Degree6[7] = {0.00015347280714195222f, 0.0013399943709373474f, 0.009618483483791351f,
                                   0.05550328642129898f,    0.24022646248340607f,   0.6931471824645996f,
                                   1.0f};
template <size_t N>
IK_AVX512_FN inline __m512 exp2_neg(__m512 z, const float (&c)[N]) {
  const __mmask16 normal = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  __m512 n;  // (the polynomial never sees -inf)
  const __m512 p = attn::avx512::exp2_poly(_mm512_max_ps(z, _mm512_set1_ps(-126.0f)), c, n);
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// 16 lanes of gelu_tanh, by the same formula: e = 2^(-2 log2(e) |y|), 1 / (1 + e) by RCP14 and
// one Newton step (~2^-28). For float32 outputs (kFloat32), where y >= 0 the factor 1 / (1 + e) is
// taken as 1 - e / (1 + e) in one FMA, so the roundings of 1 + e and of the reciprocal fall on the
// small correction e r, not on the factor (x * r was up to 2 ulps off near x = 3.4, twice torch's
// own error); bf16 outputs keep the shorter form (the same bits as before that change, within
// their rounding anyway).
template <bool kFloat32>
IK_AVX512_FN inline __m512 gelu16(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 y = _mm512_mul_ps(x, _mm512_fmadd_ps(x2, _mm512_set1_ps(kGeluC * kGeluA), _mm512_set1_ps(kGeluC)));
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f * 1.4426950408889634f));
  const __m512 e = kFloat32 ? exp2_neg(z, kExp2Degree6) : exp2_neg(z, kExp2Degree5);
  const __m512 d = _mm512_add_ps(e, _mm512_set1_ps(1.0f));  // [1, 2]
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));  // Newton: r (2 - d r)
  const __mmask16 negative = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
  if constexpr (kFloat32) {
    const __m512 factor = _mm512_mask_mul_ps(_mm512_fnmadd_ps(e, r, _mm512_set1_ps(1.0f)), negative, e, r);
    return _mm512_mul_ps(x, factor);  // x (1 - e / (1 + e)), or x e / (1 + e) where y < 0
  } else {
    return _mm512_mul_ps(_mm512_mask_mul_ps(x, negative, x, e), r);  // x (or x e where y < 0) / (1 + e)
  }
}

IK_AVX512_FN inline void gelu_tanh(float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = attn::avx512::lane_mask(n - i);
    attn::avx512::store(x + i, gelu16<true>(attn::avx512::load(x + i, m)), m);
  }
}

IK_AVX512_FN inline void gelu_tanh(uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = attn::avx512::lane_mask(n - i);
    attn::avx512::store(x + i, gelu16<false>(attn::avx512::load(x + i, m)), m);
  }
}

// bf16 with AVX-512 BF16: VCVTNEPS2BF16 rounds to nearest even in one instruction (the integer
// rounding above takes five); Zen 4 runs 512-bit operations at one a cycle, so they count.
#define IK_ACT_BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
IK_ACT_BF16_FN inline void gelu_tanh_bf16_isa(uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = attn::avx512::lane_mask(n - i);
    const __m256bh y = _mm512_cvtneps_pbh(gelu16<false>(attn::avx512::load(x + i, m)));
    _mm256_mask_storeu_epi16(x + i, m, reinterpret_cast<__m256i>(y));
  }
}

inline bool has_bf16_isa() {
  static const bool ok = attn::avx512::available() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

}  // namespace avx512
}  // namespace act
}  // namespace idefics3_kit
#endif

#ifdef IK_HAVE_AVX2_DECODE
namespace idefics3_kit {
namespace act {
namespace avx2 {

// 8 lanes of gelu_tanh for CPUs with AVX2 + FMA and no AVX-512 (AMD Zen 2 / Zen 3): the float32
// form of avx512::gelu16 (x (1 - e / (1 + e)), or x e / (1 + e) where y < 0), with e from the
// shared exp_neg (degree 7, ~1e-7, exactly 0 below -87) and an exact division. Why: there the bf16
// tower runs as float32 and its GELU after fc1 as torch's F.gelu, 11-15 ms per [2048 x 3072] call
// on a 2-core Zen 3 (aten::gelu, 5% of the tower); the portable loop took 34 ms.
IK_AVX2_FN inline __m256 gelu8(__m256 x) {
  const __m256 x2 = _mm256_mul_ps(x, x);
  const __m256 y = _mm256_mul_ps(x, _mm256_fmadd_ps(x2, _mm256_set1_ps(kGeluC * kGeluA), _mm256_set1_ps(kGeluC)));
  const __m256 abs_y = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), y);
  const __m256 e = attn::avx2::exp_neg(_mm256_mul_ps(abs_y, _mm256_set1_ps(-2.0f)));
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
  const __m256 negative = _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 factor = _mm256_blendv_ps(_mm256_fnmadd_ps(e, r, _mm256_set1_ps(1.0f)), _mm256_mul_ps(e, r), negative);
  return _mm256_mul_ps(x, factor);
}

// 8 float32 -> 8 bf16 bits, rounded to nearest even; a NaN stays a quiet NaN (float_to_bf16_rne).
IK_AVX2_FN inline __m128i to_bf16(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet_nan = _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet_nan, nan);  // [8 x 32]: each value in its low half
  const __m256i packed = _mm256_packus_epi32(bits, bits);            // lanes 0-3 | 4-7 in each 128-bit half
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0)));
}

IK_AVX2_FN inline void gelu_tanh(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
  for (; i < n; ++i) x[i] = act::gelu_tanh(x[i]);  // the tail: the portable formula
}

IK_AVX2_FN inline void gelu_tanh(uint16_t* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x + i), to_bf16(gelu8(attn::avx2::load8(x + i))));
  for (; i < n; ++i) x[i] = float_to_bf16_rne(act::gelu_tanh(bf16_bits_to_float(x[i])));
}

}  // namespace avx2
}  // namespace act
}  // namespace idefics3_kit
#endif

namespace idefics3_kit {
namespace act {

// gelu_tanh over x[0, n) in place: AVX-512 where the CPU has it, else AVX2 + FMA, else the
// portable loop.
inline void gelu_tanh_inplace(float* x, int64_t n) {
#ifdef IK_HAVE_AVX512_PATH
  if (attn::avx512::available()) return avx512::gelu_tanh(x, n);
#endif
#ifdef IK_HAVE_AVX2_DECODE
  if (attn::avx2::available()) return avx2::gelu_tanh(x, n);
#endif
  gelu_tanh_portable(x, n);
}

inline void gelu_tanh_inplace(uint16_t* x, int64_t n) {
#ifdef IK_HAVE_AVX512_PATH
  if (avx512::has_bf16_isa()) return avx512::gelu_tanh_bf16_isa(x, n);
  if (attn::avx512::available()) return avx512::gelu_tanh(x, n);
#endif
#ifdef IK_HAVE_AVX2_DECODE
  if (attn::avx2::available()) return avx2::gelu_tanh(x, n);
#endif
  gelu_tanh_portable(x, n);
}

}  // namespace act
}  // namespace idefics3_kit

IK_INTRINSICS_END
