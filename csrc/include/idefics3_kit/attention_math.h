// Torch-free building blocks of the CPU attention kernels: bf16 <-> fp32, a vectorizable exp,
// softmax rows, and the single-query (decode) partial attention over a key range.
//
// Loops are written over fixed-width lane arrays so that the compiler vectorizes them for
// each ISA clone (IK_MULTIVERSION: default / x86-64-v3 / x86-64-v4, picked at load time),
// without -ffast-math: the reduction order is the one written here.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "bf16.h"
#include "pillow_resample.h"  // IK_MULTIVERSION, IK_ALWAYS_INLINE
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include "avx2_math.h"
#endif

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace attn {

constexpr int kLanes = 16;  // one AVX-512 register of floats
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

IK_ALWAYS_INLINE float load_f(const float* p, int64_t i) { return p[i]; }
IK_ALWAYS_INLINE float load_f(const uint16_t* p, int64_t i) { return bf16_bits_to_float(p[i]); }
IK_ALWAYS_INLINE void store_f(float* p, int64_t i, float v) { p[i] = v; }
IK_ALWAYS_INLINE void store_f(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16_rne(v); }

// exp(x) for x <= 0 (softmax arguments), relative error ~1e-7; exactly 0 below -87 and for -inf.
// 2^(x log2 e) = 2^n * 2^f with n = round(.), |f| <= 1/2, 2^f by a degree-7 Taylor series.
// A NaN comes back as NaN: a NaN score (or inf - inf) must poison its softmax row as in torch.
// It is clamped to 0 on the way so that the int conversion below never sees a NaN (undefined).
// The constants every exp_neg (this one, avx512::, avx2::) shares: the series' coefficients
// highest degree first (Horner: p = p * f + c), 1/7! .. 1/1!, 1.
constexpr float kExpFloor = -87.0f, kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;
constexpr float kExpSeries[8] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                                 1.0f / 6.0f,    0.5f,           1.0f,           1.0f};
IK_ALWAYS_INLINE float exp_neg(float x) {
  const float xc = x < kExpFloor ? kExpFloor : (x <= 0.0f ? x : 0.0f);
  const float t = xc * kLog2e;
  const float n = std::nearbyint(t);
  const float f = (t - n) * kLn2;  // e^f = 2^(t - n)
  float p = kExpSeries[0];
  for (int i = 1; i < 8; ++i) p = p * f + kExpSeries[i];
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return x < kExpFloor ? 0.0f : (x <= 0.0f ? p * scale : x);  // NaN passes through
}

// Key masks as bits: bit j % 16 of keep[j / 16] is set when key j may be attended to (16 keys
// per word, so that the AVX-512 path loads a word straight into a mask register).
IK_ALWAYS_INLINE bool kept(const uint16_t* keep, int64_t j) { return (keep[j >> 4] >> (j & 15)) & 1u; }

// Softmax of one score row, written as probabilities (normalized) into p[0, n):
//   x_j = s_j * scale for j < valid (-inf for a masked key: keep given and its bit clear), -inf
//   for valid <= j < n (keys after a causal row's position; their probability is written as 0).
// Callers skip rows with no key to attend to. As torch's float32 softmax (attention_ref): a NaN
// x_j, a +inf x_j, or x_j all -inf make the whole row NaN (through max, exp(x - max) and the sum).
// A masked key is -inf whatever its score (masked_fill in the reference: an infinite or NaN score
// of a masked key must not reach the row, as it would through an additive -inf bias).
template <typename in_t>
IK_ALWAYS_INLINE float masked_logit(const in_t* s, const uint16_t* keep, float scale, int j) {
  return keep && !kept(keep, j) ? kNegInf : load_f(s, j) * scale;
}

template <typename in_t, typename out_t>
IK_ALWAYS_INLINE void softmax_row_impl(const in_t* s, int n, int valid, float scale, const uint16_t* keep, float* x,
                                       out_t* p) {
  float mx[kLanes];
  for (int l = 0; l < kLanes; ++l) mx[l] = kNegInf;
  int j = 0;
  for (; j + kLanes <= valid; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = masked_logit(s, keep, scale, j + l);
      x[j + l] = v;
      mx[l] = v > mx[l] ? v : mx[l];  // a NaN is dropped here but comes back through exp(NaN - m)
    }
  for (; j < valid; ++j) {
    const float v = masked_logit(s, keep, scale, j);
    x[j] = v;
    mx[0] = v > mx[0] ? v : mx[0];
  }
  float m = mx[0];
  for (int l = 1; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  float sum[kLanes] = {0.0f};
  j = 0;
  for (; j + kLanes <= valid; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_neg(x[j + l] - m);
      x[j + l] = e;
      sum[l] += e;
    }
  for (; j < valid; ++j) {
    x[j] = exp_neg(x[j] - m);
    sum[0] += x[j];
  }
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += sum[l];
  const float inv = 1.0f / total;
  for (j = 0; j < valid; ++j) store_f(p, j, x[j] * inv);
  for (; j < n; ++j) store_f(p, j, 0.0f);
}

IK_MULTIVERSION static void softmax_row_portable(const float* s, int n, int valid, float scale,
                                                 const uint16_t* keep, float* x, float* p) {
  softmax_row_impl(s, n, valid, scale, keep, x, p);
}
IK_MULTIVERSION static void softmax_row_portable(const uint16_t* s, int n, int valid, float scale,
                                                 const uint16_t* keep, float* x, uint16_t* p) {
  softmax_row_impl(s, n, valid, scale, keep, x, p);
}

// Whether n values hold a NaN or an infinity (every exponent bit set). No early exit: the loop
// vectorizes, and the rows it is asked about are short.
template <typename T, typename U>
IK_ALWAYS_INLINE bool nonfinite_impl(const T* p, int64_t n, U exponent) {
  U any = 0;
  for (int64_t i = 0; i < n; ++i) {
    U bits;
    std::memcpy(&bits, p + i, sizeof(U));
    any |= (bits & exponent) == exponent;
  }
  return any != 0;
}
IK_MULTIVERSION static bool any_nonfinite(const float* p, int64_t n) {
  return nonfinite_impl(p, n, static_cast<uint32_t>(0x7F800000u));
}
IK_MULTIVERSION static bool any_nonfinite(const uint16_t* p, int64_t n) {
  return nonfinite_impl(p, n, static_cast<uint16_t>(0x7F80u));
}

// ---------------------------------------------------------------------------------------------
// Decode: G query heads that share one key/value head, one query each, against keys [j0, j1).

struct DecodeArgs {
  int64_t d = 0;       // head dim
  int64_t groups = 0;  // query heads per key/value head
  float scale = 1.0f;
  const void* q = nullptr;  // G rows of d, q_stride apart
  int64_t q_stride = 0;
  const void* k = nullptr;  // key rows, k_stride apart
  const void* v = nullptr;
  int64_t k_stride = 0, v_stride = 0;
  const uint8_t* key_mask = nullptr;  // 1 = attend; nullptr = all
};

// m of a partial (below): NaN when its sum is NaN (the row is poisoned), else the max of its scores.
IK_ALWAYS_INLINE float partial_max(float m, float l) { return l != l ? l : m; }

// Partial (unnormalized) result of keys [j0, j1): for each group g, o[g * d + i] =
// sum_j exp(x_gj - m_g) v_j[i], with m_g = max_j x_gj and l_g = sum_j exp(x_gj - m_g);
// m_g = -inf, l_g = 0 when every key in the range is masked (or scores -inf). Masked keys take
// part in the sum over v with weight exactly 0, as in the reference's P·V, where 0 * NaN and
// 0 * inf are NaN: a non-finite value of a masked key poisons that column. A NaN in the scores
// (or +inf - +inf) makes l_g NaN, and then m_g is set to NaN too (partial_max), so that the
// combine sees it even when the range's max is -inf.
// Scratch: qf [G * d], row [d], x [G * (j1 - j0)] floats.
template <typename in_t>
IK_ALWAYS_INLINE void decode_partial_impl(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m, float* l,
                                          float* qf, float* row, float* x) {
  const int64_t d = a.d, G = a.groups, n = j1 - j0;
  const in_t* q = static_cast<const in_t*>(a.q);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = load_f(q + g * a.q_stride, i) * a.scale;
  // Scores: each key row is loaded (and widened) once for all G query heads.
  const in_t* k = static_cast<const in_t*>(a.k);
  for (int64_t j = 0; j < n; ++j) {
    const bool masked = a.key_mask && !a.key_mask[j0 + j];
    if (masked) {
      for (int64_t g = 0; g < G; ++g) x[g * n + j] = kNegInf;
      continue;
    }
    const in_t* kr = k + (j0 + j) * a.k_stride;
    for (int64_t i = 0; i < d; ++i) row[i] = load_f(kr, i);
    for (int64_t g = 0; g < G; ++g) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const float* qg = qf + g * d;
      for (int64_t i = 0; i < d; i += 8)  // d is a multiple of 8
        for (int l2 = 0; l2 < 8; ++l2) acc[l2] += qg[i + l2] * row[i + l2];
      x[g * n + j] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* xg = x + g * n;
    float mg = kNegInf;
    for (int64_t j = 0; j < n; ++j) mg = xg[j] > mg ? xg[j] : mg;
    const float mv = mg == kNegInf ? 0.0f : mg;  // all -inf: every weight is exp(-inf) = 0
    float lg = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      xg[j] = exp_neg(xg[j] - mv);
      lg += xg[j];
    }
    m[g] = partial_max(mg, lg);
    l[g] = lg;
    std::fill(o + g * d, o + (g + 1) * d, 0.0f);
  }
  // Values: each value row is loaded once and accumulated into all G outputs (masked keys too,
  // with weight 0: see above).
  const in_t* v = static_cast<const in_t*>(a.v);
  for (int64_t j = 0; j < n; ++j) {
    const in_t* vr = v + (j0 + j) * a.v_stride;
    for (int64_t i = 0; i < d; ++i) row[i] = load_f(vr, i);
    for (int64_t g = 0; g < G; ++g) {
      const float pj = x[g * n + j];
      float* og = o + g * d;
      for (int64_t i = 0; i < d; ++i) og[i] += pj * row[i];
    }
  }
}

// The driver both vector decode paths (avx512::, avx2::) share: the G query rows scaled into qf
// [G * d] once, then sweeps over the keys of up to 4 query heads each (their accumulators stay in
// registers). sweep(g0, std::integral_constant<int, GC>{}) runs heads g0 .. g0 + GC - 1.
template <typename in_t, class Sweep>
inline void decode_by_head_groups(const DecodeArgs& a, float* qf, Sweep&& sweep) {
  const int64_t d = a.d, G = a.groups;
  const in_t* q = static_cast<const in_t*>(a.q);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = load_f(q + g * a.q_stride, i) * a.scale;
  for (int64_t g0 = 0; g0 < G; g0 += 4) {
    switch (std::min<int64_t>(4, G - g0)) {
      case 4: sweep(g0, std::integral_constant<int, 4>{}); break;
      case 3: sweep(g0, std::integral_constant<int, 3>{}); break;
      case 2: sweep(g0, std::integral_constant<int, 2>{}); break;
      default: sweep(g0, std::integral_constant<int, 1>{}); break;
    }
  }
}

// The loops above compiled per ISA (IK_MULTIVERSION): the AVX2 clone is what CPUs without
// AVX-512 run (AMD Zen 2 / Zen 3), where the baseline SSE2 build took ~10% of an int4 decode step
// at 128 tokens of context. The clones may contract a * b + c into an FMA, so their last bits can
// differ from the default clone's: the kernel tests hold every path to the same tolerance.
IK_MULTIVERSION static void decode_partial_loops(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m,
                                                 float* l, float* qf, float* row, float* x, const uint16_t*) {
  decode_partial_impl<uint16_t>(a, j0, j1, o, m, l, qf, row, x);
}
IK_MULTIVERSION static void decode_partial_loops(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m,
                                                 float* l, float* qf, float* row, float* x, const float*) {
  decode_partial_impl<float>(a, j0, j1, o, m, l, qf, row, x);
}
template <typename in_t>
void decode_partial_portable(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m, float* l, float* qf,
                             float* row, float* x) {
  decode_partial_loops(a, j0, j1, o, m, l, qf, row, x, static_cast<const in_t*>(nullptr));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(IDEFICS3_KIT_NO_AVX512)
#define IK_HAVE_AVX512_PATH 1
}  // namespace attn
}  // namespace idefics3_kit
#include <immintrin.h>
namespace idefics3_kit {
namespace attn {
// Hand-vectorized decode for AVX-512 CPUs (picked at run time; the portable loops above stay
// as the fallback). The auto-vectorizer turned the per-key dot products into shuffles.
#define IK_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
namespace avx512 {

IK_AVX512_FN inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
IK_AVX512_FN inline __m512 load(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 2^x split for VSCALEFPS: x = n + f with n = round(x) and f in [-0.5, 0.5]; -> p(f), the
// polynomial with coefficients c (highest degree first), and n, so that 2^x ~ scalef(p(f), n).
// The flash kernels' softmax takes a degree-3 polynomial (below bf16 rounding), the GELU pass a
// degree-6 one (float32 accuracy).
template <size_t N>
IK_AVX512_FN inline __m512 exp2_poly(__m512 x, const float (&c)[N], __m512& n) {
  n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(c[0]);
  for (size_t i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return p;
}

// Same polynomial as exp_neg above, 16 lanes at a time; NaN lanes stay NaN (vmaxps returns its
// second operand when either is NaN, so x goes second).
IK_AVX512_FN inline __m512 exp_neg(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFloor), _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(kExpFloor), x);
  const __m512 t = _mm512_mul_ps(xc, _mm512_set1_ps(kLog2e));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(kLn2));
  __m512 p = _mm512_set1_ps(kExpSeries[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpSeries[i]));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~tiny), p, _mm512_castsi512_ps(e));
}

inline __mmask16 lane_mask(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Sums of 16 vectors: lane L of the tree's result holds the full sum of vector tree_perm()[L].
IK_AVX512_FN inline __m512 hsum_tree(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 512 -> 256 bits per vector, two vectors per register
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // -> 128 bits per vector
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // -> 64 bits
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));  // -> 32 bits
}

// Index vector that puts the tree's sums in natural order (found once by running the tree on
// vectors whose sums are known, rather than by hand-deriving the shuffle algebra).
IK_AVX512_FN inline __m512i tree_order() {
  alignas(64) float sums[16];
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = _mm512_set1_ps(static_cast<float>(i));
  _mm512_store_ps(sums, hsum_tree(v));
  alignas(64) int32_t idx[16];
  for (int lane = 0; lane < 16; ++lane) idx[static_cast<int>(sums[lane]) / 16] = lane;
  return _mm512_load_si512(idx);
}

// 16 dot products -> one vector, lane i = sum of v[i].
IK_AVX512_FN inline __m512 hsum16(const __m512* v) {
  static const __m512i order = tree_order();
  return _mm512_permutexvar_ps(order, hsum_tree(v));
}

// Software prefetch for the cache rows of a decode step: its weight stream has evicted them, and
// one item's keys (or values) are one short stream (~19 KB at 150 tokens, hd 64) that the hardware
// prefetchers barely ramp up on. The key loop fetches the keys kKeyPrefetchRows ahead and the value
// rows of its own keys, which the value loop reads after the softmax. Measured in an int4 step of
// SmolVLM-256M at 150 tokens of context (Zen 4, in-process A/B): the attention's parallel regions
// 334 -> 294 and 443 -> 405 us a step.
constexpr int64_t kKeyPrefetchRows = 16;
template <typename in_t>
IK_AVX512_FN inline void prefetch_rows(const in_t* row, int64_t stride, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d * static_cast<int64_t>(sizeof(in_t)); c += 64)
      _mm_prefetch(reinterpret_cast<const char*>(row + r * stride) + c, _MM_HINT_T0);
}

IK_AVX512_FN inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
// Round to nearest even, as float_to_bf16_rne, for the values the bf16 kernels store: computed
// from bf16 inputs, so a NaN among them carries a bf16 payload or is the default NaN, its low 16
// bits are 0 and the rounding add cannot carry it into inf (a float32 NaN with a low payload
// could: this store is not for float32 inputs; the scalar conversion handles those).
IK_AVX512_FN inline void store(uint16_t* p, __m512 v, __mmask16 m) {
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// One head's partial softmax over its n scores xg: the weights exp(x - max) into w (float: may be
// xg itself; bf16: rounded, for VDPBF16PS), its max and sum into m and l (partial_max's rule).
template <typename w_t>
IK_AVX512_FN inline void head_weights(const float* xg, int64_t n, w_t* w, float& m, float& l) {
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int64_t jj = 0; jj < n; jj += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, lane_mask(n - jj), xg + jj));
  const float mg = _mm512_reduce_max_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(mg == kNegInf ? 0.0f : mg);  // all masked: every weight is 0
  for (int64_t jj = 0; jj < n; jj += 16) {
    const __mmask16 mk = lane_mask(n - jj);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, xg + jj), mv)));
    store(w + jj, e, mk);
    sum = _mm512_add_ps(sum, e);
  }
  l = _mm512_reduce_add_ps(sum);
  m = partial_max(mg, l);
}

// GC (<= 4) query heads (g0 .. g0 + GC - 1 of the group) over keys [j0, j1); qf holds all G
// scaled query rows; x is [GC][n] scratch; o/m/l as decode_partial. Keys go 4 at a time:
// 4 x GC dot products accumulate in registers and are reduced together (hsum16).
template <typename in_t, int GC>
IK_AVX512_FN void decode_heads(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t j1, float* o, float* m, float* l,
                               const float* qf, float* x) {
  static_assert(GC >= 1 && GC <= 4, "4 keys x 4 heads fill the 16 accumulators");
  const int64_t d = a.d, n = j1 - j0;
  const in_t* k = static_cast<const in_t*>(a.k);
  const in_t* v = static_cast<const in_t*>(a.v);
  const uint8_t* km = a.key_mask ? a.key_mask + j0 : nullptr;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const in_t* kr = k + (j0 + j) * a.k_stride;
    const int64_t ahead = std::min<int64_t>(4, n - j - kKeyPrefetchRows);  // keys left that far ahead
    if (ahead > 0) prefetch_rows(k + (j0 + j + kKeyPrefetchRows) * a.k_stride, a.k_stride, ahead, d);
    prefetch_rows(v + (j0 + j) * a.v_stride, a.v_stride, 4, d);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mk = lane_mask(d - i);
      __m512 kv[4];
      for (int r = 0; r < 4; ++r) kv[r] = load(kr + r * a.k_stride + i, mk);
      for (int g = 0; g < GC; ++g) {
        const __m512 qv = _mm512_maskz_loadu_ps(mk, qf + (g0 + g) * d + i);
        for (int r = 0; r < 4; ++r) acc[g * 4 + r] = _mm512_fmadd_ps(kv[r], qv, acc[g * 4 + r]);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, hsum16(acc));
    for (int g = 0; g < GC; ++g)
      for (int r = 0; r < 4; ++r) x[g * n + j + r] = (km && !km[j + r]) ? kNegInf : sums[g * 4 + r];
  }
  for (; j < n; ++j) {  // the last n % 4 keys one by one
    const in_t* kr = k + (j0 + j) * a.k_stride;
    __m512 acc[GC];
    for (int g = 0; g < GC; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mk = lane_mask(d - i);
      const __m512 kv = load(kr + i, mk);
      for (int g = 0; g < GC; ++g) acc[g] = _mm512_fmadd_ps(kv, _mm512_maskz_loadu_ps(mk, qf + (g0 + g) * d + i), acc[g]);
    }
    for (int g = 0; g < GC; ++g) x[g * n + j] = (km && !km[j]) ? kNegInf : _mm512_reduce_add_ps(acc[g]);
  }
  for (int g = 0; g < GC; ++g) {
    head_weights(x + g * n, n, x + g * n, m[g0 + g], l[g0 + g]);
    std::fill(o + (g0 + g) * d, o + (g0 + g + 1) * d, 0.0f);
  }
  // Values, 4 rows at a time: each output chunk is loaded and stored once per 4 rows. Masked
  // rows have weight exactly 0 and are multiplied all the same (0 * NaN = NaN, as the reference).
  j = 0;
  for (; j + 4 <= n; j += 4) {
    const in_t* vr = v + (j0 + j) * a.v_stride;
    __m512 p[GC][4];
    for (int g = 0; g < GC; ++g)
      for (int r = 0; r < 4; ++r) p[g][r] = _mm512_set1_ps(x[g * n + j + r]);
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mk = lane_mask(d - i);
      __m512 vv[4];
      for (int r = 0; r < 4; ++r) vv[r] = load(vr + r * a.v_stride + i, mk);
      for (int g = 0; g < GC; ++g) {
        float* og = o + (g0 + g) * d + i;
        __m512 acc = _mm512_maskz_loadu_ps(mk, og);
        for (int r = 0; r < 4; ++r) acc = _mm512_fmadd_ps(p[g][r], vv[r], acc);
        _mm512_mask_storeu_ps(og, mk, acc);
      }
    }
  }
  for (; j < n; ++j) {
    const in_t* vr = v + (j0 + j) * a.v_stride;
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mk = lane_mask(d - i);
      const __m512 vv = load(vr + i, mk);
      for (int g = 0; g < GC; ++g) {
        float* og = o + (g0 + g) * d + i;
        _mm512_mask_storeu_ps(og, mk, _mm512_fmadd_ps(_mm512_set1_ps(x[g * n + j]), vv, _mm512_maskz_loadu_ps(mk, og)));
      }
    }
  }
}

// softmax_row_impl with explicit vectors.
// masked_logit for the 16 lanes from key j, a multiple of 16 (recomputed in each pass rather
// than stored): the mask word selects s * scale or -inf.
template <typename in_t>
IK_AVX512_FN inline __m512 logits(const in_t* s, const uint16_t* keep, __m512 sc, int j, __mmask16 mk) {
  if (!keep) return _mm512_mul_ps(load(s + j, mk), sc);
  return _mm512_mask_mul_ps(_mm512_set1_ps(kNegInf), static_cast<__mmask16>(keep[j >> 4]), load(s + j, mk), sc);
}

template <typename in_t, typename out_t>
IK_AVX512_FN void softmax_row(const in_t* s, int n, int valid, float scale, const uint16_t* keep, float* x,
                             out_t* p) {
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 mx = _mm512_set1_ps(kNegInf);
  for (int j = 0; j < valid; j += 16) {  // (a NaN may be dropped from the max: exp(NaN - m) keeps it)
    const __mmask16 mk = lane_mask(valid - j);
    mx = _mm512_mask_max_ps(mx, mk, mx, logits(s, keep, sc, j, mk));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < valid; j += 16) {
    const __mmask16 mk = lane_mask(valid - j);
    const __m512 e = _mm512_maskz_mov_ps(mk, exp_neg(_mm512_sub_ps(logits(s, keep, sc, j, mk), m)));
    _mm512_mask_storeu_ps(x + j, mk, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  int j = 0;
  for (; j < valid; j += 16) {
    const __mmask16 mk = lane_mask(valid - j);
    store(p + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + j), inv), mk);
  }
  for (j = valid; j < n; j += 16) store(p + j, _mm512_setzero_ps(), lane_mask(n - j));
}

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma");
  return ok;
}

#if __GNUC__ >= 11 || defined(__clang__)
#define IK_HAVE_DECODE_BF16DOT 1
#define IK_BF16DOT_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// bf16 decode with VDPBF16PS (AVX-512 BF16: Zen 4, Cooper Lake, Sapphire Rapids without AMX's
// path): decode_heads' sweeps with the numerics of the AMX kernel (decode_amx.h): scores as bf16
// products summed in fp32 (q unscaled, the dot times scale), the softmax in fp32, its weights
// rounded to bf16 for the product with V, pairs of keys per instruction. Why: decode_heads
// converts every K and V element to fp32 and spends one FMA per element and head; at 900 tokens
// of context that was ~1.2 ms of a 5 ms int4 step at SmolVLM-256M shapes.
inline bool bf16dot_available() {
  static const bool ok = available() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

IK_BF16DOT_FN inline __mmask32 pair_mask(int64_t count) {  // the first count of 32 bf16 lanes
  return count >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1u << count) - 1u);
}

IK_BF16DOT_FN inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// Scores of GC (<= 4) query heads g0.. over keys [j0, j1) into x [GC][n] (-inf where masked), 4
// keys at a time, 32 dims per instruction.
template <int GC>
IK_BF16DOT_FN void scores_bf16dot(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t n, float* x) {
  const int64_t d = a.d;
  const auto* q = static_cast<const uint16_t*>(a.q) + g0 * a.q_stride;
  const auto* k = static_cast<const uint16_t*>(a.k);
  const uint8_t* km = a.key_mask ? a.key_mask + j0 : nullptr;
  const __m512 scale = _mm512_set1_ps(a.scale);
  const __m512i first_four = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 1, 0);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const uint16_t* kr = k + (j0 + j) * a.k_stride;
    const int64_t ahead = std::min<int64_t>(4, n - j - kKeyPrefetchRows);
    if (ahead > 0) prefetch_rows(kr + kKeyPrefetchRows * a.k_stride, a.k_stride, ahead, d);
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 32) {
      const __mmask32 mk = pair_mask(d - i);
      __m512i kv[4];
      for (int r = 0; r < 4; ++r) kv[r] = _mm512_maskz_loadu_epi16(mk, kr + r * a.k_stride + i);
      for (int g = 0; g < GC; ++g) {
        const __m512i qv = _mm512_maskz_loadu_epi16(mk, q + g * a.q_stride + i);
        for (int r = 0; r < 4; ++r) acc[g * 4 + r] = dot2(acc[g * 4 + r], kv[r], qv);
      }
    }
    const __m512 sums = _mm512_mul_ps(hsum16(acc), scale);  // lane 4g + r: head g, key j + r
    __mmask8 keep = 0xF;
    if (km) {
      uint32_t bytes;
      std::memcpy(&bytes, km + j, 4);
      keep = static_cast<__mmask8>(_mm_test_epi8_mask(_mm_cvtsi32_si128(static_cast<int>(bytes)), _mm_set1_epi8(-1)));
    }
    for (int g = 0; g < GC; ++g) {
      const __m512 lanes = _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(4 * g), first_four), sums);
      _mm_storeu_ps(x + g * n + j, _mm_mask_mov_ps(_mm_set1_ps(kNegInf), keep, _mm512_castps512_ps128(lanes)));
    }
  }
  for (; j < n; ++j) {  // the last n % 4 keys one by one
    const uint16_t* kr = k + (j0 + j) * a.k_stride;
    for (int g = 0; g < GC; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 32) {
        const __mmask32 mk = pair_mask(d - i);
        acc = dot2(acc, _mm512_maskz_loadu_epi16(mk, kr + i), _mm512_maskz_loadu_epi16(mk, q + g * a.q_stride + i));
      }
      x[g * n + j] = (km && !km[j]) ? kNegInf : _mm512_reduce_add_ps(acc) * a.scale;
    }
  }
}

// o[g][c0 .. c0 + 64) += sum over the n keys of P[g][j] V[j][c0 ..] (P: pb [GC][n2] bf16, keys
// past n zero; n2 = n rounded up to even): two keys per VDPBF16PS, their V rows interleaved in
// pairs by unpacklo/hi (which leaves, in 32-bit lane 4L + t of the lo / hi result, dims 8L + t /
// 8L + 4 + t of a 32-dim block); the accumulators stay in registers over all keys and are put back
// in dim order once at the end.
template <int GC>
IK_BF16DOT_FN void values_bf16dot(const DecodeArgs& a, int64_t j0, int64_t n, int64_t n2, const uint16_t* pb,
                                  int64_t c0, float* o) {
  const int64_t d = a.d, width = std::min<int64_t>(64, d - c0), blocks = (width + 31) / 32;
  const auto* v = static_cast<const uint16_t*>(a.v);
  __m512 acc[GC][4];  // [head][block * 2 + (lo, hi)]
  for (int g = 0; g < GC; ++g)
    for (int t = 0; t < 4; ++t) acc[g][t] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* v0 = v + (j0 + j) * a.v_stride + c0;
    const bool pair = j + 1 < n;
    __m512i lo[2], hi[2];
    for (int64_t b = 0; b < blocks; ++b) {
      const __mmask32 mk = pair_mask(width - 32 * b);
      const __m512i r0 = _mm512_maskz_loadu_epi16(mk, v0 + 32 * b);
      const __m512i r1 = pair ? _mm512_maskz_loadu_epi16(mk, v0 + a.v_stride + 32 * b) : zero;
      lo[b] = _mm512_unpacklo_epi16(r0, r1);
      hi[b] = _mm512_unpackhi_epi16(r0, r1);
    }
    for (int g = 0; g < GC; ++g) {
      uint32_t both;
      std::memcpy(&both, pb + g * n2 + j, 4);  // P[g][j], P[g][j + 1] (0 past n)
      const __m512i p = _mm512_set1_epi32(static_cast<int>(both));
      for (int64_t b = 0; b < blocks; ++b) {
        acc[g][2 * b] = dot2(acc[g][2 * b], lo[b], p);
        acc[g][2 * b + 1] = dot2(acc[g][2 * b + 1], hi[b], p);
      }
    }
  }
  // lane 4L + t of lo holds dim 8L + t, of hi dim 8L + 4 + t: dims 0..15 of a block are lanes
  // (lo 0-3, hi 0-3, lo 4-7, hi 4-7), dims 16..31 (lo 8-11, hi 8-11, lo 12-15, hi 12-15)
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int g = 0; g < GC; ++g) {
    float* og = o + g * d + c0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t left = width - 32 * b;
      const __m512 dims0 = _mm512_permutex2var_ps(acc[g][2 * b], first, acc[g][2 * b + 1]);
      const __m512 dims1 = _mm512_permutex2var_ps(acc[g][2 * b], second, acc[g][2 * b + 1]);
      const __mmask16 m0 = lane_mask(left);
      _mm512_mask_storeu_ps(og + 32 * b, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, og + 32 * b), dims0));
      if (left > 16) {
        const __mmask16 m1 = lane_mask(left - 16);
        _mm512_mask_storeu_ps(og + 32 * b + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, og + 32 * b + 16), dims1));
      }
    }
  }
}

// decode_heads with VDPBF16PS: heads g0 .. g0 + GC - 1 over keys [j0, j1); x is [GC][n] float
// scratch, followed by room for the bf16 weights [GC][n rounded up to even].
template <int GC>
IK_BF16DOT_FN void decode_heads_bf16dot(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t j1, float* o, float* m,
                                        float* l, float* x) {
  const int64_t d = a.d, n = j1 - j0, n2 = (n + 1) / 2 * 2;
  auto* pb = reinterpret_cast<uint16_t*>(x + GC * n);
  scores_bf16dot<GC>(a, g0, j0, n, x);
  for (int g = 0; g < GC; ++g) {
    head_weights(x + g * n, n, pb + g * n2, m[g0 + g], l[g0 + g]);
    if (n2 > n) pb[g * n2 + n] = 0;
    std::fill(o + (g0 + g) * d, o + (g0 + g + 1) * d, 0.0f);
  }
  for (int64_t c0 = 0; c0 < d; c0 += 64) values_bf16dot<GC>(a, j0, n, n2, pb, c0, o + g0 * d);
}
#endif  // __GNUC__ >= 11 || clang

template <typename in_t>
IK_AVX512_FN void decode_partial(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m, float* l, float* qf,
                                 float* x) {
#ifdef IK_HAVE_DECODE_BF16DOT
  if constexpr (std::is_same_v<in_t, uint16_t>) {
    if (bf16dot_available()) {
      for (int64_t g0 = 0; g0 < a.groups; g0 += 4) {
        switch (std::min<int64_t>(4, a.groups - g0)) {
          case 4: decode_heads_bf16dot<4>(a, g0, j0, j1, o, m, l, x); break;
          case 3: decode_heads_bf16dot<3>(a, g0, j0, j1, o, m, l, x); break;
          case 2: decode_heads_bf16dot<2>(a, g0, j0, j1, o, m, l, x); break;
          default: decode_heads_bf16dot<1>(a, g0, j0, j1, o, m, l, x); break;
        }
      }
      return;
    }
  }
#endif
  decode_by_head_groups<in_t>(a, qf, [&](int64_t g0, auto gc) {
    decode_heads<in_t, decltype(gc)::value>(a, g0, j0, j1, o, m, l, qf, x);
  });
}

}  // namespace avx512
}  // namespace attn
}  // namespace idefics3_kit
#include "decode_amx.h"
namespace idefics3_kit {
namespace attn {
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define IK_HAVE_AVX2_DECODE 1
// Hand-vectorized decode for CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 2 / Zen 3): the same
// sweeps as avx512::decode_heads in 8-lane registers. The multiversioned portable loops above ran
// 32 us per layer at 128 tokens of context and 61 us at 300 (SmolVLM-256M: 9 query heads on 3
// key/value heads, d = 64; one thread), on the main thread while the other thread waited: 7.5% of
// all samples of an int4 decode step (perf). Head dims that are multiples of 8 only (the op's
// models: 64, 128); others take the portable loops.
namespace avx2 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

IK_AVX2_FN inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
IK_AVX2_FN inline __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// exp_neg (above) on 8 lanes; NaN lanes stay NaN (vmaxps returns its second operand, x, for a NaN).
IK_AVX2_FN inline __m256 exp_neg(__m256 x) {
  const __m256 floor = _mm256_set1_ps(kExpFloor);
  const __m256 tiny = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(floor, x), _mm256_set1_ps(kLog2e));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(kLn2));
  __m256 p = _mm256_set1_ps(kExpSeries[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpSeries[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Sums of 8 vectors: lane i = the sum of v[i]'s lanes.
IK_AVX2_FN inline __m256 hsum8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // halves of v0..v3
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Scores of GC query heads (g0 .. g0 + GC - 1) against keys [j0, j1) into x [GC][n]: KR keys at a
// time, GC x KR <= 8 dot products in registers, reduced by one hsum8.
template <typename in_t, int GC>
IK_AVX2_FN void decode_scores(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t n, const float* qf, float* x) {
  constexpr int KR = GC == 1 ? 8 : GC == 2 ? 4 : 2;
  const int64_t d = a.d;
  const in_t* k = static_cast<const in_t*>(a.k);
  const uint8_t* km = a.key_mask ? a.key_mask + j0 : nullptr;
  int64_t j = 0;
  for (; j + KR <= n; j += KR) {
    const in_t* kr = k + (j0 + j) * a.k_stride;
    __m256 acc[8];
    for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      __m256 kv[KR];
      for (int r = 0; r < KR; ++r) kv[r] = load8(kr + r * a.k_stride + i);
      for (int g = 0; g < GC; ++g) {
        const __m256 qv = _mm256_loadu_ps(qf + (g0 + g) * d + i);
        for (int r = 0; r < KR; ++r) acc[g * KR + r] = _mm256_fmadd_ps(kv[r], qv, acc[g * KR + r]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, hsum8(acc));
    for (int g = 0; g < GC; ++g)
      for (int r = 0; r < KR; ++r) x[g * n + j + r] = (km && !km[j + r]) ? kNegInf : sums[g * KR + r];
  }
  for (; j < n; ++j) {  // the last n % KR keys one by one
    const in_t* kr = k + (j0 + j) * a.k_stride;
    __m256 acc[GC];
    for (int g = 0; g < GC; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 kv = load8(kr + i);
      for (int g = 0; g < GC; ++g) acc[g] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qf + (g0 + g) * d + i), acc[g]);
    }
    for (int g = 0; g < GC; ++g) x[g * n + j] = (km && !km[j]) ? kNegInf : avx2_math::hsum(acc[g]);
  }
}

// x [n] scores -> exp(x - max) in place; *m, *l as decode_partial's (m -inf when every key is masked).
IK_AVX2_FN inline void exp_row(float* x, int64_t n, float* m, float* l) {
  __m256 mx = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(x + j));  // (a dropped NaN: l keeps it)
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float mg = kNegInf;
  for (float v : lanes) mg = v > mg ? v : mg;
  for (int64_t t = j; t < n; ++t) mg = x[t] > mg ? x[t] : mg;
  const float mv = mg == kNegInf ? 0.0f : mg;  // all -inf: every weight is exp(-inf) = 0
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(mv)));
    _mm256_storeu_ps(x + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  float lg = avx2_math::hsum(sum);
  for (; j < n; ++j) {
    x[j] = attn::exp_neg(x[j] - mv);
    lg += x[j];
  }
  *m = partial_max(mg, lg);
  *l = lg;
}

// o[g] += sum_j x[g][j] v_j for GC heads, 4 value rows at a time (each output chunk loaded and
// stored once per 4 rows). Masked rows have weight exactly 0 and are multiplied all the same
// (0 * NaN = NaN, as the reference).
template <typename in_t, int GC>
IK_AVX2_FN void decode_values(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t n, const float* x, float* o) {
  const int64_t d = a.d;
  const in_t* v = static_cast<const in_t*>(a.v);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const in_t* vr = v + (j0 + j) * a.v_stride;
    for (int64_t i = 0; i < d; i += 8) {
      __m256 vv[4];
      for (int r = 0; r < 4; ++r) vv[r] = load8(vr + r * a.v_stride + i);
      for (int g = 0; g < GC; ++g) {
        float* og = o + (g0 + g) * d + i;
        __m256 acc = _mm256_loadu_ps(og);
        for (int r = 0; r < 4; ++r) acc = _mm256_fmadd_ps(_mm256_broadcast_ss(x + g * n + j + r), vv[r], acc);
        _mm256_storeu_ps(og, acc);
      }
    }
  }
  for (; j < n; ++j) {
    const in_t* vr = v + (j0 + j) * a.v_stride;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 vv = load8(vr + i);
      for (int g = 0; g < GC; ++g) {
        float* og = o + (g0 + g) * d + i;
        _mm256_storeu_ps(og, _mm256_fmadd_ps(_mm256_broadcast_ss(x + g * n + j), vv, _mm256_loadu_ps(og)));
      }
    }
  }
}

template <typename in_t, int GC>
IK_AVX2_FN void decode_heads(const DecodeArgs& a, int64_t g0, int64_t j0, int64_t j1, float* o, float* m, float* l,
                             const float* qf, float* x) {
  const int64_t d = a.d, n = j1 - j0;
  decode_scores<in_t, GC>(a, g0, j0, n, qf, x);
  for (int g = 0; g < GC; ++g) {
    exp_row(x + g * n, n, m + g0 + g, l + g0 + g);
    std::fill(o + (g0 + g) * d, o + (g0 + g + 1) * d, 0.0f);
  }
  decode_values<in_t, GC>(a, g0, j0, n, x, o);
}

// decode_partial (below) for a.d a multiple of 8; scratch qf [G * d], x [min(G, 4) * (j1 - j0)].
template <typename in_t>
IK_AVX2_FN void decode_partial(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m, float* l, float* qf,
                               float* x) {
  decode_by_head_groups<in_t>(a, qf, [&](int64_t g0, auto gc) {
    decode_heads<in_t, decltype(gc)::value>(a, g0, j0, j1, o, m, l, qf, x);
  });
}

}  // namespace avx2
#endif

// Dispatch: AMX tiles for bf16 decode where usable, the AVX-512 path when the CPU has it, then
// the AVX2 path (decode only), the portable loops otherwise.
template <typename in_t, typename out_t>
inline void softmax_row(const in_t* s, int n, int valid, float scale, const uint16_t* keep, float* x, out_t* p) {
#ifdef IK_HAVE_AVX512_PATH
  if (avx512::available()) return avx512::softmax_row<in_t, out_t>(s, n, valid, scale, keep, x, p);
#endif
  softmax_row_portable(s, n, valid, scale, keep, x, p);
}

// Floats of decode_partial's x scratch for G query heads over n keys: the scores [G][n], and after
// them, on the AVX-512 BF16 path, the softmax weights in bf16 [<= 4 heads][n rounded up to even].
inline int64_t decode_scratch_floats(int64_t groups, int64_t n) { return groups * n + 2 * (n + 1); }

// Whether decode_partial takes the AMX path for these arguments (which needs no scratch).
inline bool decode_uses_amx(bool bf16, int64_t d, int64_t groups) {
#ifdef IK_HAVE_AMX_PATH
  return bf16 && amx::usable(d, groups);
#else
  (void)bf16, (void)d, (void)groups;
  return false;
#endif
}

// Scratch (unused on the AMX path): qf [G * d], row [d], x [decode_scratch_floats(G, j1 - j0)].
inline void decode_partial(const DecodeArgs& a, bool bf16, int64_t j0, int64_t j1, float* o, float* m, float* l,
                           float* qf, float* row, float* x) {
#ifdef IK_HAVE_AMX_PATH
  if (decode_uses_amx(bf16, a.d, a.groups)) return amx::decode_partial(a, j0, j1, o, m, l);
#endif
#ifdef IK_HAVE_AVX512_PATH
  if (avx512::available()) {
    if (bf16)
      avx512::decode_partial<uint16_t>(a, j0, j1, o, m, l, qf, x);
    else
      avx512::decode_partial<float>(a, j0, j1, o, m, l, qf, x);
    return;
  }
#endif
#ifdef IK_HAVE_AVX2_DECODE
  if (avx2::available() && a.d % 8 == 0) {
    if (bf16)
      avx2::decode_partial<uint16_t>(a, j0, j1, o, m, l, qf, x);
    else
      avx2::decode_partial<float>(a, j0, j1, o, m, l, qf, x);
    return;
  }
#endif
  if (bf16)
    decode_partial_portable<uint16_t>(a, j0, j1, o, m, l, qf, row, x);
  else
    decode_partial_portable<float>(a, j0, j1, o, m, l, qf, row, x);
}

// Combine S partial results of one query head (log-sum-exp): out = sum_s e^(m_s - M) o_s /
// sum_s e^(m_s - M) l_s. For a row with at least one key to attend to (callers write the empty
// rows' zeros themselves), with the float32 softmax's rules: a NaN partial (a NaN score, or +inf
// among the scores) or every score -inf makes the whole row NaN. A split whose keys are all
// masked has weight 0 but is still added: its o holds 0 * v, NaN where a masked value is NaN or
// infinite, as the reference's P·V gives.
template <typename out_t>
inline void decode_combine(int64_t d, int64_t splits, const float* o, int64_t o_split_stride, const float* m,
                           const float* l, int64_t ml_stride, out_t* out) {
  float mx = kNegInf;
  bool nan = false;
  for (int64_t s = 0; s < splits; ++s) {
    const float ms = m[s * ml_stride];
    nan |= ms != ms;
    mx = ms > mx ? ms : mx;
  }
  if (nan || mx == kNegInf) {
    for (int64_t i = 0; i < d; ++i) store_f(out, i, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  float denom = 0.0f;
  float acc[512];  // d <= 512 (checked by the op)
  std::fill(acc, acc + d, 0.0f);
  for (int64_t s = 0; s < splits; ++s) {
    const float ms = m[s * ml_stride];
    const float w = ms == kNegInf ? 0.0f : std::exp(ms - mx);  // mx = +inf: inf - inf = NaN, as softmax
    denom += w * l[s * ml_stride];
    const float* os = o + s * o_split_stride;
    for (int64_t i = 0; i < d; ++i) acc[i] += w * os[i];
  }
  const float inv = 1.0f / denom;
  for (int64_t i = 0; i < d; ++i) store_f(out, i, acc[i] * inv);
}

}  // namespace attn
}  // namespace idefics3_kit

IK_INTRINSICS_END
