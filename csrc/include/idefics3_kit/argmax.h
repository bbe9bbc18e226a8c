// Torch-free kernel of the argmax_last op: the index of the first maximum of one row, by
// torch.argmax's rule (ties go to the first; a NaN counts as the largest value, the first NaN
// wins; -0 and +0 are equal).
//
// Why: greedy decoding takes an argmax over the vocabulary at every step. torch's CPU argmax
// walks the row one element at a time, and the blocked ATen composition ops/reduce.py used
// instead still costs eight dispatched ops per call (~115 us of an int4 decode step of ~4.3 ms,
// most of it the cache misses of each op's metadata). Here a float's bits become an integer key
// with the same order, so both passes are integer max / min / compare loops that vectorize
// without fast-math flags:
//   pass 1: the largest and smallest keys (a NaN's key lies outside the infinities': then the
//           first NaN is the answer);
//   pass 2: the first entry whose key equals the largest, 64 entries at a time.
#pragma once

#include <cstdint>
#include <cstring>

#include "pillow_resample.h"  // IK_MULTIVERSION, IK_ALWAYS_INLINE

namespace idefics3_kit {
namespace argmax {

IK_ALWAYS_INLINE uint32_t bits_of(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
IK_ALWAYS_INLINE uint32_t bits_of(uint16_t v) { return static_cast<uint32_t>(v) << 16; }  // bf16

IK_ALWAYS_INLINE bool is_nan(uint32_t b) { return (b & 0x7FFFFFFFu) > 0x7F800000u; }

// An int32 with the order of the non-NaN floats: non-negative floats keep their bits, negative
// ones get their magnitude bits flipped, so a larger magnitude gives a smaller key. -0 gets -1,
// just below +0's 0 (the comparison pass counts them as equal, as torch does). A NaN's key lies
// above +inf's (sign clear) or below -inf's (sign set): kNanAbove / kNanBelow tell them apart.
IK_ALWAYS_INLINE int32_t key(uint32_t b) {
  const int32_t s = static_cast<int32_t>(b);
  return s ^ static_cast<int32_t>(static_cast<uint32_t>(s >> 31) & 0x7FFFFFFFu);
}
constexpr int32_t kNanAbove = 0x7F800000;                      // key(+inf)
constexpr int32_t kNanBelow = static_cast<int32_t>(0x807FFFFFu);  // key(-inf)

constexpr int64_t kBlock = 64;  // entries per pass-2 test before the early exit

template <typename T>
IK_ALWAYS_INLINE int64_t row_impl(const T* x, int64_t n) {
  int32_t best = INT32_MIN, least = INT32_MAX;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t k = key(bits_of(x[i]));
    best = k > best ? k : best;
    least = k < least ? k : least;
  }
  if (best > kNanAbove || least < kNanBelow) {  // a NaN: the first one is the answer
    for (int64_t i = 0; i < n; ++i)
      if (is_nan(bits_of(x[i]))) return i;
  }
  const int32_t also = best == 0 ? -1 : best;  // a maximum of +0 is matched by -0 too
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t i1 = i0 + kBlock < n ? i0 + kBlock : n;
    uint32_t hit = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t k = key(bits_of(x[i]));
      hit |= static_cast<uint32_t>(k == best) | static_cast<uint32_t>(k == also);
    }
    if (!hit) continue;
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t k = key(bits_of(x[i]));
      if (k == best || k == also) return i;
    }
  }
  return 0;  // n == 0 (the op refuses an empty row before it gets here)
}

// Index of the first maximum of x[0, n) for float32 and bfloat16 (bits) rows.
IK_MULTIVERSION inline int64_t row(const float* x, int64_t n) { return row_impl(x, n); }
IK_MULTIVERSION inline int64_t row(const uint16_t* x, int64_t n) { return row_impl(x, n); }

// The reference both are tested against: the float comparison itself, one entry at a time.
template <typename T>
int64_t row_reference(const T* x, int64_t n) {
  int64_t at = 0;
  float best = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v;
    const uint32_t b = bits_of(x[i]);
    std::memcpy(&v, &b, sizeof v);
    if (v != v) return i;  // the first NaN
    if (i == 0 || v > best) {
      best = v;
      at = i;
    }
  }
  return at;
}

}  // namespace argmax
}  // namespace idefics3_kit
