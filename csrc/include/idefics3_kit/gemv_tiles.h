// The tiling every vectorized few-row GEMV path shares (gemv_bf16.h, gemv_quant.h and
// gemv_quant_avx2.h, each in its AVX-512 and AVX2 forms): up to four x rows at a time against R
// weight rows at a time, the sums plus bias rounded to bf16 once. One owner for the loop, so the
// paths differ only in their register blocks.
//
// A path hands in a Blocks type with
//   template <int M> static constexpr int rows_per_block();   // R for M x rows (register budget)
//   template <int M, int R> void run(int64_t m0, int64_t r, float* sums) const;
// where run() writes sums[m * R + q] = sum over k of x[m0 + m] * w[r + q] (no bias). run() carries
// the path's target attribute; this loop is plain C++ and calls it once per R weight rows (~4 KB
// of weights at the decoder's K), so the call costs nothing measurable.
#pragma once

#include <cstdint>

#include "bf16.h"

namespace idefics3_kit {
namespace tiles {

// Where a path writes: y[(m0 + m) * y_stride + r] = bf16(sums + bias[r]).
struct Out {
  const float* bias;  // [N] or nullptr
  uint16_t* y;
  int64_t y_stride;
};

template <int M>
inline void store(const Out& o, const float* sums, int64_t m0, int64_t r, int rows) {
  for (int m = 0; m < M; ++m)
    for (int q = 0; q < rows; ++q) {
      const float v = sums[m * rows + q] + (o.bias ? o.bias[r + q] : 0.0f);
      o.y[(m0 + m) * o.y_stride + r + q] = float_to_bf16_rne(v);
    }
}

// Weight rows [r0, r1) against x rows m0 .. m0 + M - 1: R at a time, the remainder one by one.
template <int M, class Blocks>
inline void rows_m(const Blocks& blocks, const Out& o, int64_t m0, int64_t r0, int64_t r1) {
  constexpr int R = Blocks::template rows_per_block<M>();
  float sums[M * R];
  int64_t r = r0;
  for (; r + R <= r1; r += R) {
    blocks.template run<M, R>(m0, r, sums);
    store<M>(o, sums, m0, r, R);
  }
  for (; r < r1; ++r) {
    blocks.template run<M, 1>(m0, r, sums);
    store<M>(o, sums, m0, r, 1);
  }
}

// Weight rows [r0, r1) for all rows_x rows of x, four at a time (the weights re-read per four).
template <class Blocks>
inline void rows(const Blocks& blocks, const Out& o, int64_t rows_x, int64_t r0, int64_t r1) {
  int64_t m0 = 0;
  for (; m0 + 4 <= rows_x; m0 += 4) rows_m<4>(blocks, o, m0, r0, r1);
  switch (rows_x - m0) {
    case 3: rows_m<3>(blocks, o, m0, r0, r1); break;
    case 2: rows_m<2>(blocks, o, m0, r0, r1); break;
    case 1: rows_m<1>(blocks, o, m0, r0, r1); break;
    default: break;
  }
}

}  // namespace tiles
}  // namespace idefics3_kit
