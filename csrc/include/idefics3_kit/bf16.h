// bfloat16 <-> float32 bit conversions shared by the torch-free kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "pillow_resample.h"  // IK_ALWAYS_INLINE

namespace idefics3_kit {

IK_ALWAYS_INLINE float bf16_bits_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even like torch's float -> bfloat16 cast, NaN kept a quiet NaN.
IK_ALWAYS_INLINE uint16_t float_to_bf16_rne(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace idefics3_kit
