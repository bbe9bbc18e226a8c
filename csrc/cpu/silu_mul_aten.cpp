// silu(gate) * up on bf16 rows, bit for bit what ATen's at::silu_out followed by at::mul_out
// computes (what the Python layers run), in one pass and without their dispatch: for decode_layers,
// where those two calls cost ~3 us a layer at SmolVLM-256M shapes (~90 us of a ~3.5 ms int4 step)
// for 1536 elements.
//
// ATen's bf16 SiLU, AVX-512 capability: per row, blocks of 64 elements take the vector path
// (x / (1 + exp(-x)) in float32 with SLEEF's expf16_u10, rounded to bf16 by cvtfp32_bf16), the last
// n % 64 the scalar one (the same expression with std::exp, rounded by c10::BFloat16). The product
// is float32's, rounded to nearest even either way; only a NaN's bits depend on the path that
// rounded it, so a row that makes a NaN is left to ATen. The one SLEEF function is libtorch_cpu's
// own exported symbol. Whether this matches is checked once, against ATen itself, over every bf16
// value (self_check): any difference (another torch, another ATen capability) turns this off.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "idefics3_kit/pillow_resample.h"  // IK_INTRINSICS_BEGIN / END
#include "kernels.h"

IK_INTRINSICS_BEGIN

#if defined(__x86_64__) && defined(__GNUC__) && !defined(IDEFICS3_KIT_NO_AVX512)
#define IK_SILU_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
extern "C" __m512 Sleef_expf16_u10(__m512);  // libtorch_cpu: what Vectorized<float>::exp calls (AVX-512)
#pragma GCC pop_options
#endif

namespace idefics3_kit {
namespace {

constexpr int64_t kVectorBlock = 64;  // elements per step of ATen's vectorized loop (2 x 32 bf16)

#ifdef IK_SILU_AVX512
#define IK_SILU_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

IK_SILU_FN inline __m512 widen(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}

IK_SILU_FN inline __m512 load(const uint16_t* p) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// ATen's cvtfp32_bf16 (vec512_bfloat16.h): round to nearest even, a NaN to 0xffff.
IK_SILU_FN inline __m256i narrow(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bias, bits), 16);
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_cvtusepi32_epi16(_mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0xffff), rounded));
}

// 16 elements; false where a NaN came out (its bits are path-dependent).
IK_SILU_FN inline bool silu_mul16(const uint16_t* gate, const uint16_t* up, uint16_t* out) {
  const __m512 x = load(gate);
  const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.0f), x));  // exp(-x), x.neg().exp()
  const __m256i act = narrow(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));  // at::silu_out's bf16
  const __m512 product = _mm512_mul_ps(widen(act), load(up));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), narrow(product));
  return _mm512_cmp_ps_mask(product, product, _CMP_UNORD_Q) == 0;
}

IK_SILU_FN bool silu_mul_row_avx512(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  const int64_t vector_end = n - n % kVectorBlock;
  bool finite = true;
  for (int64_t i = 0; i < vector_end; i += 16) finite &= silu_mul16(gate + i, up + i, out + i);
  for (int64_t i = vector_end; i < n; ++i) {  // ATen's scalar tail
    c10::BFloat16 g, u;
    std::memcpy(&g, gate + i, 2);
    std::memcpy(&u, up + i, 2);
    const float x = static_cast<float>(g);
    const c10::BFloat16 act = x / (1.0f + std::exp(-x));
    const c10::BFloat16 product = static_cast<float>(act) * static_cast<float>(u);
    finite &= !std::isnan(static_cast<float>(product));
    std::memcpy(out + i, &product, 2);
  }
  return finite;
}

// ATen's own answer for one row: what the Python layers compute.
void silu_mul_row_reference(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor g = at::from_blob(const_cast<uint16_t*>(gate), {n}, opts);
  at::Tensor u = at::from_blob(const_cast<uint16_t*>(up), {n}, opts);
  at::Tensor o = at::from_blob(out, {n}, opts);
  at::silu_out(o, g);
  at::mul_out(o, o, u);
}

// Every bf16 bit pattern as gate (against a spread of up values) through both, once in rows of
// 1576 (1536 on the vector path, a scalar tail of 40) and once in rows of 63 (all scalar): equal
// wherever ours answers (a row with a NaN is ATen's anyway). ~1100 rows, a few ms, once.
bool self_check() {
  constexpr int64_t kValues = 1 << 16, kLongest = 1576;
  std::vector<uint16_t> gate(kValues + kLongest), up(kValues + kLongest), ours(kLongest), theirs(kLongest);
  for (int64_t i = 0; i < static_cast<int64_t>(gate.size()); ++i) {
    gate[i] = static_cast<uint16_t>(i);
    const auto sign = static_cast<uint16_t>((i & 1) << 15);
    up[i] = static_cast<uint16_t>(0x3c00 + (i * 7919) % 0x0800) ^ sign;  // +-[2^-7, 2^9)
  }
  for (int64_t n : {kLongest, int64_t{kVectorBlock - 1}}) {
    for (int64_t start = 0; start < kValues; start += n) {
      if (!silu_mul_row_avx512(gate.data() + start, up.data() + start, ours.data(), n)) continue;
      silu_mul_row_reference(gate.data() + start, up.data() + start, theirs.data(), n);
      if (std::memcmp(ours.data(), theirs.data(), static_cast<size_t>(n) * 2) != 0) return false;
    }
  }
  return true;
}
#endif  // IK_SILU_AVX512

}  // namespace

bool silu_mul_matches_aten() {
  static const bool ok = [] {
#ifdef IK_SILU_AVX512
    return at::get_cpu_capability() == "AVX512" &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && self_check();
#else
    return false;
#endif
  }();
  return ok;
}

bool silu_mul_rows_as_aten(const uint16_t* gate, const uint16_t* up, int64_t row_stride, uint16_t* out, int64_t rows,
                           int64_t n) {
  // ATen splits an op over threads past its grain size, at element offsets that move the scalar
  // tails; below it the op runs serially, row by row, as here.
  if (rows * n > at::internal::GRAIN_SIZE || !silu_mul_matches_aten()) return false;
#ifdef IK_SILU_AVX512
  for (int64_t r = 0; r < rows; ++r)
    if (!silu_mul_row_avx512(gate + r * row_stride, up + r * row_stride, out + r * n, n))
      silu_mul_row_reference(gate + r * row_stride, up + r * row_stride, out + r * n, n);
  return true;
#else
  return false;
#endif
}

}  // namespace idefics3_kit

IK_INTRINSICS_END
