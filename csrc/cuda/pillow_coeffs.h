// Pillow-exact LANCZOS coefficients in the CUDA kernels' flat layout (host side, torch-free).
//
// The algorithm itself (coefficients in double, 22-bit fixed point, Pillow 13's pass order,
// clip8) lives once, in csrc/include/idefics3_kit/pillow_resample.h, shared with the CPU
// kernels; this header only lays its tables out the way the GPU resample jobs read them:
// coeffs [out_size * ksize] and bounds [out_size * 2] = (first input, tap count).
#pragma once

#include <cstdint>
#include <vector>

// Only the tables and the scalar reference are needed here: leave out the CPU kernels' SIMD
// paths (their intrinsics headers warn under the CUDA side's -Werror host builds).
#ifndef IDEFICS3_KIT_NO_AVX512
#define IDEFICS3_KIT_NO_AVX512 1
#endif
#ifndef IDEFICS3_KIT_NO_CLONES
#define IDEFICS3_KIT_NO_CLONES 1
#endif
#include "../include/idefics3_kit/pillow_resample.h"

namespace idefics3_kit {
namespace pillow {

struct FlatCoeffs {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  std::vector<int32_t> coeffs;  // [out_size * ksize], zero beyond each tap count
  std::vector<int32_t> bounds;  // [out_size * 2]: xmin, xcount
};

inline FlatCoeffs precompute_coeffs(int in_size, int out_size) {
  const AxisCoeffs a = lanczos_coeffs(in_size, out_size);
  FlatCoeffs f;
  f.in_size = in_size;
  f.out_size = out_size;
  f.ksize = a.ksize;
  f.coeffs.assign(a.k.begin(), a.k.end());
  f.bounds.resize(static_cast<size_t>(out_size) * 2);
  for (int i = 0; i < out_size; i++) {
    f.bounds[2 * i] = a.first[i];
    f.bounds[2 * i + 1] = a.count[i];
  }
  return f;
}

// Host reference resize (uint8 HWC): the shared CPU implementation, run serially. The GPU
// tests compare the kernels' own index/arithmetic functions against it.
inline std::vector<uint8_t> resize_reference(const uint8_t* src, int h, int w, int c, int out_h, int out_w) {
  std::vector<uint8_t> out(static_cast<size_t>(out_h) * out_w * c);
  resize(src, h, w, c, out.data(), out_h, out_w, [](int64_t b, int64_t e, auto&& fn) { fn(b, e); });
  return out;
}

}  // namespace pillow
}  // namespace idefics3_kit
