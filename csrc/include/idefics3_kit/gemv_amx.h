// decode_linear's AMX path: a bf16 linear over 4 to 16 rows (a batched decode step) on the tile
// unit, y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), accumulated in fp32, rounded to bf16 once.
//
// Why: from about four rows the AVX-512 BF16 loop (gemv_bf16.h) is bound by its multiply-adds,
// not by reading the weights: at SmolVLM-256M's shapes (30 layers' projections, 212 MB, one
// thread) eight rows took 19.5-20.7 ms there and 9.7-10.5 ms here, sixteen 39 ms and 11.7 ms; at
// one to three rows the loop is as fast or faster (10.8-12.0 ms against 11.9-12.3 ms here). One
// TDPBF16PS multiplies 16 weight rows by 32 columns of up to 16 x rows, so the step is back to
// reading each weight once. The weights stay in torch's plain [N, K] layout: the product is
// computed transposed, y^T[n, m] = W[n, :] . x^T[:, m], so a weight block is an A tile loaded as
// it lies (16 rows of 64 bytes, K * 2 bytes apart) and only x is re-laid out (into the B tile's
// pair layout, once per call: x is a few KiB).
//
// Per pass of 32 weight rows: C tiles 0 and 1 (16 rows each, fp32 [16, M]) accumulate over the
// 32-column chunks of K, each chunk one B tile (x's pairs, tile 4) and two A tiles (2, 3); the
// rows past the last multiple of 16 make one shorter tile. Sums are the same products in another order than
// the one-row loop's, so a row's output in a batch of 4-16 may differ from its output alone by
// the usual fp32 rounding (as it did through oneDNN, which served batches of 5 and more before).
// K must be a multiple of 32 (usable() says so; the caller uses the AVX-512 loop otherwise).
#pragma once

#include "amx.h"

#ifdef IK_HAVE_AMX_PATH
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "gemv_bf16.h"  // Job

namespace idefics3_kit {
namespace gemv {
namespace amx {

constexpr int64_t kMinRows = 4, kMaxRows = 16;  // x rows this path takes (fewer: the AVX-512 loop)
constexpr int64_t kPrefetchRows = 32;           // rows of the next pass prefetched during a pass

inline bool usable(int64_t rows_x, int64_t k) {
  return rows_x >= kMinRows && rows_x <= kMaxRows && k % 32 == 0 && idefics3_kit::amx::available();
}

// Tiles 0-1: C [w weight rows, m x rows] fp32; 2-3: A [w weight rows, 32 columns] bf16;
// 4: B [16 column pairs, m x rows x 2] bf16. w = 16, or fewer for the last rows of a range (each
// C row depends only on its A row and B, so a row's sum is the same in a tile of any height: the
// result does not depend on how the op splits the rows over its workers).
IK_AMX_FN inline void configure(int64_t m, int64_t w) {
  idefics3_kit::amx::TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.rows[t] = static_cast<uint8_t>(w);
  cfg.rows[4] = 16;
  cfg.colsb[0] = cfg.colsb[1] = cfg.colsb[4] = static_cast<uint16_t>(m * 4);
  cfg.colsb[2] = cfg.colsb[3] = 64;
  asm volatile("" : : "r"(&cfg) : "memory");  // keep the stores (see vision_amx.h's configure)
  _tile_loadconfig(&cfg);
}

// x [m, k] (row stride x_stride) -> xb: per 32-column chunk c, per pair p < 16, per row i < m:
// x[i, 32c + 2p], x[i, 32c + 2p + 1]. One chunk is one B tile of 16 rows of m * 4 bytes. The op
// packs x once per call and its workers share it (pack_x, then rows_packed per weight and range).
inline void pack_x(const uint16_t* x, int64_t m, int64_t k, int64_t x_stride, std::vector<uint16_t>& xb) {
  const int64_t chunks = k / 32;
  xb.resize(chunks * 16 * m * 2);
  auto* out = reinterpret_cast<uint32_t*>(xb.data());  // a column pair is one 32-bit word
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* row = x + i * x_stride;
    for (int64_t pair = 0; pair < k / 2; ++pair) {  // pair = 16 c + p
      uint32_t word;
      std::memcpy(&word, row + 2 * pair, 4);
      out[pair * m + i] = word;
    }
  }
}

// A stored C tile [w, m] (+ bias) -> y[i, r + n] for i < m, n < w, rounded to bf16.
inline void store_block(const Job& j, const float* c, int64_t r, int64_t w) {
  const int64_t m = j.rows_x;
  for (int64_t n = 0; n < w; ++n) {
    const float b = j.bias ? j.bias[r + n] : 0.0f;
    for (int64_t i = 0; i < m; ++i) j.y[i * j.y_stride + r + n] = float_to_bf16_rne(c[n * m + i] + b);
  }
}

// Weight rows [r, r_end) in tiles of w_rows rows, two tiles a pass (the last pass may hold one):
// C accumulates over K's 32-column chunks.
IK_AMX_FN inline void tiles(const Job& j, const uint16_t* xb, int64_t r, int64_t r_end, int64_t w_rows,
                            float (*c)[16 * kMaxRows]) {
  const int64_t m = j.rows_x, chunks = j.k / 32, a_stride = j.k * 2, b_stride = m * 4;
  while (r < r_end) {
    const bool two = r + 2 * w_rows <= r_end;
    const uint16_t* w = j.w + r * j.k;
    // the next pass's rows, one line per row and chunk, as this pass reads the same columns: its
    // A loads are 32 row streams K * 2 bytes apart, which the hardware prefetchers lose track of
    const int64_t ahead = std::clamp<int64_t>(r_end - (r + 2 * w_rows), 0, kPrefetchRows);
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      for (int64_t q = 0; q < ahead; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(w + (2 * w_rows + q) * j.k + 32 * ch), _MM_HINT_T0);
      _tile_loadd(4, xb + ch * 16 * m * 2, b_stride);
      _tile_loadd(2, w + 32 * ch, a_stride);
      _tile_dpbf16ps(0, 2, 4);
      if (two) {
        _tile_loadd(3, w + w_rows * j.k + 32 * ch, a_stride);
        _tile_dpbf16ps(1, 3, 4);
      }
    }
    _tile_stored(0, c[0], b_stride);
    store_block(j, c[0], r, w_rows);
    if (two) {
      _tile_stored(1, c[1], b_stride);
      store_block(j, c[1], r + w_rows, w_rows);
    }
    r += two ? 2 * w_rows : w_rows;
  }
}

// Weight rows [r0, r1) for every row of x, x already packed into xb (pack_x; rows_x in
// [kMinRows, kMaxRows], k % 32 == 0).
IK_AMX_FN inline void rows_packed(const Job& j, const uint16_t* xb, int64_t r0, int64_t r1) {
  float c[2][16 * kMaxRows];
  const int64_t full_end = r0 + (r1 - r0) / 16 * 16, rest = r1 - full_end;
  if (full_end > r0) {
    configure(j.rows_x, 16);
    tiles(j, xb, r0, full_end, 16, c);
  }
  if (rest > 0) {  // the last rows: one tile of that height
    configure(j.rows_x, rest);
    tiles(j, xb, full_end, r1, rest, c);
  }
  _tile_release();
}

// The same, packing x itself (one weight and range: the C++ tests).
IK_AMX_FN inline void rows(const Job& j, int64_t r0, int64_t r1) {
  std::vector<uint16_t> xb;
  pack_x(j.x, j.rows_x, j.k, j.x_stride, xb);
  rows_packed(j, xb.data(), r0, r1);
}

}  // namespace amx
}  // namespace gemv
}  // namespace idefics3_kit
#endif
