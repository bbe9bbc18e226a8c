// Torch-free kernel of the rms_norm op: Llama's RMSNorm of one row,
//   out = weight * cast(x * rsqrt(mean(x²) + eps))
// with the statistics in float32 and the normalized row cast to the input dtype before the
// weight multiplies it (transformers' LlamaRMSNorm order, so bf16 rounds at the same points).
// torch's own F.rms_norm runs as several ATen ops per call (pow, mean, add, rsqrt, mul, casts); in a one-token decode
// step that is ~60 calls of tiny rows, where the per-op cost is the whole cost.
#pragma once

#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "pillow_resample.h"  // IK_MULTIVERSION, IK_ALWAYS_INLINE

namespace idefics3_kit {
namespace norm {

IK_ALWAYS_INLINE float to_f(float v) { return v; }
IK_ALWAYS_INLINE float to_f(uint16_t v) { return bf16_bits_to_float(v); }
IK_ALWAYS_INLINE float round_as(float v, const float*) { return v; }
IK_ALWAYS_INLINE float round_as(float v, const uint16_t*) { return to_f(float_to_bf16_rne(v)); }
IK_ALWAYS_INLINE void store(float* p, float v) { *p = v; }
IK_ALWAYS_INLINE void store(uint16_t* p, float v) { *p = float_to_bf16_rne(v); }

template <typename T>
IK_ALWAYS_INLINE void row_impl(const T* x, const T* w, int64_t d, float eps, T* out) {
  constexpr int kLanes = 16;  // partial sums in lanes: vectorizes without reassociation flags
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = to_f(x[i + l]);
      part[l] += v * v;
    }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  for (; i < d; ++i) sum += to_f(x[i]) * to_f(x[i]);
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
  for (int64_t c = 0; c < d; ++c) store(out + c, to_f(w[c]) * round_as(to_f(x[c]) * inv, x));
}

IK_MULTIVERSION inline void row(const float* x, const float* w, int64_t d, float eps, float* out) {
  row_impl(x, w, d, eps, out);
}
IK_MULTIVERSION inline void row(const uint16_t* x, const uint16_t* w, int64_t d, float eps, uint16_t* out) {
  row_impl(x, w, d, eps, out);
}

}  // namespace norm
}  // namespace idefics3_kit
