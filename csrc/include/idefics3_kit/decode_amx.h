// bf16 decode attention on Intel AMX (Sapphire Rapids and later): the same partial result as
// attn::decode_partial (unnormalized output, max and sum of one key range for all G query heads
// of a key/value head), with both matrix products on the tile unit.
//
// Why: with AVX-512 the bf16 decode kernel is bound by arithmetic (converting bf16 to fp32 and
// one FMA per element and head), not by reading the cache. On AMX one TDPBF16PS does
// 16 x 16 x 32 multiply-adds, so the work per key drops to a few cycles and reading K/V is
// what is left (benchmarks/attention_cpu.py).
//
//   scores:  S[16 keys, G] += K[16 keys, 32 dims] . Qvnni[16 dim pairs, G]     (K straight from the cache)
//   output:  O[G, 16 dims] += P[G, 32 keys] . Vvnni[16 key pairs, 16 dims]   (V re-laid out in pairs)
//
// Numerics as torch's bf16 attention: bf16 products accumulated in fp32, softmax in fp32, the
// probabilities rounded to bf16 before the product with V, as torch's bf16 attention does (here the
// unnormalized exp(s - max) of each key range; attention_ref rounds the normalized ones).
#pragma once

#include "amx.h"

#ifdef IK_HAVE_AMX_PATH
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace idefics3_kit {
namespace attn {
namespace amx {

constexpr int kMaxGroups = 16;  // query heads per key/value head: the columns of one tile
constexpr int kMaxChunks = 4;   // head dim / 32 tiles of Q held at once (head dim <= 128)

using idefics3_kit::amx::available;
using idefics3_kit::amx::TileConfig;

// Whether this call can run here: bf16, head dim a multiple of 32 up to 128, <= 16 heads per group.
inline bool usable(int64_t d, int64_t groups) {
  return d % 32 == 0 && d / 32 <= kMaxChunks && groups >= 1 && groups <= kMaxGroups && available();
}

// tmm0 scores [16 keys x G], tmm1 K rows (scores) / V pairs (output) [16 x 64 B],
// tmm2..5 Q chunks [16 dim pairs x G], tmm6 output [G x 16 dims], tmm7 probabilities [G x 32 keys].
IK_AMX_FN inline void configure(int groups) {
  TileConfig cfg;
  const uint16_t g_bytes = static_cast<uint16_t>(groups * 4);
  cfg.rows[0] = 16, cfg.colsb[0] = g_bytes;
  cfg.rows[1] = 16, cfg.colsb[1] = 64;
  for (int t = 2; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = g_bytes;
  cfg.rows[6] = static_cast<uint8_t>(groups), cfg.colsb[6] = 64;
  cfg.rows[7] = static_cast<uint8_t>(groups), cfg.colsb[7] = 64;
  _tile_loadconfig(&cfg);
}

IK_AMX_FN inline void load_q_tiles(const uint16_t* qv, int64_t chunks, int64_t stride_bytes) {
  const int64_t tile = 16 * stride_bytes / 2;  // elements per Q chunk tile
  _tile_loadd(2, qv, stride_bytes);
  if (chunks > 1) _tile_loadd(3, qv + tile, stride_bytes);
  if (chunks > 2) _tile_loadd(4, qv + 2 * tile, stride_bytes);
  if (chunks > 3) _tile_loadd(5, qv + 3 * tile, stride_bytes);
}

// S[16, G] for keys kr .. kr + 15 (row stride k_stride elements) over `chunks` 32-dim chunks.
IK_AMX_FN inline void score_block(const uint16_t* kr, int64_t k_stride, int64_t chunks, float* s, int groups) {
  const int64_t kb = k_stride * 2;
  _tile_zero(0);
  _tile_loadd(1, kr, kb);
  _tile_dpbf16ps(0, 1, 2);
  if (chunks > 1) {
    _tile_loadd(1, kr + 32, kb);
    _tile_dpbf16ps(0, 1, 3);
  }
  if (chunks > 2) {
    _tile_loadd(1, kr + 64, kb);
    _tile_dpbf16ps(0, 1, 4);
  }
  if (chunks > 3) {
    _tile_loadd(1, kr + 96, kb);
    _tile_dpbf16ps(0, 1, 5);
  }
  _tile_stored(0, s, groups * 4);
}

// Output column of lane `i` (0..15) of tile 2c + h: the pair interleave (vpunpck{l,h}wd) works
// within 128-bit lanes, so tile columns map to head-dim indices in groups of four.
inline int64_t out_column(int64_t chunk, int half, int i) { return chunk * 32 + 8 * (i / 4) + 4 * half + (i % 4); }

// V rows [j, j + 32) (rows past n: zeros) re-laid out as d / 16 tiles [16 key pairs][16 x 2]:
// row p of a tile holds (v[2p][c], v[2p + 1][c]) for its 16 columns c (see out_column).
IK_AMX_FN inline void repack_v_block(const uint16_t* v, int64_t v_stride, int64_t j, int64_t n, int64_t d, uint16_t* out) {
  const int64_t chunks = d / 32;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t p = 0; p < 16; ++p) {
    const int64_t r = j + 2 * p;
    const uint16_t* r0 = v + r * v_stride;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i a = r < n ? _mm512_loadu_si512(r0 + c * 32) : zero;
      const __m512i b = r + 1 < n ? _mm512_loadu_si512(r0 + v_stride + c * 32) : zero;
      uint16_t* t = out + (2 * c * 16 + p) * 32;
      _mm512_storeu_si512(t, _mm512_unpacklo_epi16(a, b));
      _mm512_storeu_si512(t + 16 * 32, _mm512_unpackhi_epi16(a, b));
    }
  }
}

IK_AMX_FN inline float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32)
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(a + i)),
                           reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + i)));
  return _mm512_reduce_add_ps(acc);
}

// Q [G, d] of one group as B tiles (kept in tmm2..5): row r of chunk c holds, for each head g,
// dims (32c + 2r, 32c + 2r + 1).
IK_AMX_FN inline void load_q(const DecodeArgs& a, std::vector<uint16_t>& qv) {
  const int64_t G = a.groups, chunks = a.d / 32;
  const auto* q = static_cast<const uint16_t*>(a.q);
  qv.assign(chunks * 16 * G * 2, 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qg = q + g * a.q_stride + c * 32 + 2 * r;
        uint16_t* dst = qv.data() + ((c * 16 + r) * G + g) * 2;
        dst[0] = qg[0], dst[1] = qg[1];
      }
  load_q_tiles(qv.data(), chunks, G * 4);
}

// Keys per chunk. Each chunk runs scores, softmax and P.V back to back with a running max
// (online softmax), so the exps of one chunk overlap the hardware prefetch of the next chunk's
// K and V instead of being a separate pass over the whole range with the memory idle.
constexpr int64_t kChunk = 256;

// Lanes 0..15 of a key mask (1 = attend) as a bit mask; all set without one.
IK_AMX_FN inline __mmask16 keep_lanes(const uint8_t* km) {
  if (!km) return 0xFFFF;
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(km)), _mm_set1_epi8(-1));
}

// 1) x[g][j] = scale * q_g . k_j for the n <= kChunk keys at k (-inf where masked), and mx[g]
//    raised to their max. 16-key tile products give S[16 keys][G]; a gather per head turns the
//    tile's columns into rows of x. The last n % 16 keys take vector dot products. A NaN score
//    may be dropped from mx (vmaxps) but stays in x, and exp_neg turns it into a NaN weight.
IK_AMX_FN inline void scores_chunk(const DecodeArgs& a, const uint16_t* k, const uint8_t* km, int64_t n, float* x,
                                   float* mx) {
  const int64_t G = a.groups, n16 = n / 16 * 16;
  const auto* q = static_cast<const uint16_t*>(a.q);
  alignas(64) float s[16 * kMaxGroups];
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(G)));
  const __m512 scale = _mm512_set1_ps(a.scale), neg_inf = _mm512_set1_ps(kNegInf);
  __m512 mxv[kMaxGroups];  // per-lane maxima, reduced once per chunk
  for (int64_t g = 0; g < G; ++g) mxv[g] = neg_inf;
  for (int64_t jb = 0; jb < n16; jb += 16) {
    score_block(k + jb * a.k_stride, a.k_stride, a.d / 32, s, static_cast<int>(G));
    const __mmask16 keep = keep_lanes(km ? km + jb : nullptr);
    for (int64_t g = 0; g < G; ++g) {
      const __m512 xg = _mm512_mask_mul_ps(neg_inf, keep, _mm512_i32gather_ps(column, s + g, 4), scale);
      _mm512_store_ps(x + g * kChunk + jb, xg);
      mxv[g] = _mm512_max_ps(mxv[g], xg);
    }
  }
  for (int64_t g = 0; g < G; ++g) mx[g] = std::max(mx[g], _mm512_reduce_max_ps(mxv[g]));
  for (int64_t j = n16; j < n; ++j)
    for (int64_t g = 0; g < G; ++g) {
      const float xj = (km && !km[j]) ? kNegInf : dot_bf16(q + g * a.q_stride, k + j * a.k_stride, a.d) * a.scale;
      x[g * kChunk + j] = xj;
      mx[g] = std::max(mx[g], xj);
    }
}

// 2) with the running max m raised to mx: the earlier sum l and output rows (oacc, [d / 16]
//    tiles of [G][16]) rescaled by exp(m_old - m), l += sum of exp(x - m) over the chunk, and
//    those weights rounded to bf16 as the rows of the probability tile pb [G][kChunk] (keys past
//    n stay 0).
IK_AMX_FN inline void softmax_chunk(int64_t groups, int64_t tiles, int64_t n, const float* x, const float* mx,
                                    uint16_t* pb, float* m, float* l, float (*oacc)[kMaxGroups * 16]) {
  for (int64_t g = 0; g < groups; ++g) {
    if (mx[g] > m[g]) {  // (a chunk that is all masked leaves m at -inf and its weights 0)
      const float alpha = m[g] == kNegInf ? 0.0f : std::exp(m[g] - mx[g]);
      m[g] = mx[g];
      l[g] *= alpha;
      const __m512 av = _mm512_set1_ps(alpha);
      for (int64_t t = 0; t < tiles; ++t) _mm512_store_ps(oacc[t] + g * 16, _mm512_mul_ps(_mm512_load_ps(oacc[t] + g * 16), av));
    }
    const float* xg = x + g * kChunk;
    const __m512 mv = _mm512_set1_ps(m[g] == kNegInf ? 0.0f : m[g]);  // all masked so far: every weight is 0
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = avx512::lane_mask(n - j);
      const __m512 e = _mm512_maskz_mov_ps(mk, avx512::exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, xg + j), mv)));
      sum = _mm512_add_ps(sum, e);
      avx512::store(pb + g * kChunk + j, e, mk);
    }
    l[g] += _mm512_reduce_add_ps(sum);
  }
}

// 3) oacc += P . V for the n keys at v, 32 at a time: each block's V pairs are re-laid out into
//    an L1-sized buffer, then each 16-column output tile takes one product. Masked keys are in
//    it with probability 0, so that a NaN or infinite value of theirs gives NaN (0 * NaN), as the
//    reference's P·V does.
IK_AMX_FN inline void weighted_values_chunk(const DecodeArgs& a, const uint16_t* v, int64_t n, const uint16_t* pb,
                                            float (*oacc)[kMaxGroups * 16]) {
  const int64_t tiles = a.d / 16;
  alignas(64) uint16_t vblk[2 * kMaxChunks][16 * 32];
  for (int64_t b = 0; b < (n + 31) / 32; ++b) {
    repack_v_block(v, a.v_stride, b * 32, n, a.d, vblk[0]);
    _tile_loadd(7, pb + b * 32, kChunk * 2);
    for (int64_t t = 0; t < tiles; ++t) {
      _tile_loadd(6, oacc[t], 64);
      _tile_loadd(1, vblk[t], 64);
      _tile_dpbf16ps(6, 7, 1);
      _tile_stored(6, oacc[t], 64);
    }
  }
}

// decode_partial for bf16 on AMX: keys [j0, j1) in chunks of kChunk.
IK_AMX_FN inline void decode_partial(const DecodeArgs& a, int64_t j0, int64_t j1, float* o, float* m, float* l) {
  const int64_t G = a.groups, d = a.d, tiles = d / 16;
  alignas(64) float x[kMaxGroups * kChunk];
  alignas(64) uint16_t pb[kMaxGroups * kChunk];
  alignas(64) float oacc[2 * kMaxChunks][kMaxGroups * 16];
  thread_local std::vector<uint16_t> qv;
  for (int64_t t = 0; t < tiles; ++t) std::fill(oacc[t], oacc[t] + G * 16, 0.0f);
  std::fill(m, m + G, kNegInf);
  std::fill(l, l + G, 0.0f);
  configure(static_cast<int>(G));
  load_q(a, qv);
  const auto* k = static_cast<const uint16_t*>(a.k);
  const auto* v = static_cast<const uint16_t*>(a.v);
  for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
    const int64_t n = std::min(kChunk, j1 - c0);
    float mx[kMaxGroups];
    std::fill(mx, mx + G, kNegInf);
    scores_chunk(a, k + c0 * a.k_stride, a.key_mask ? a.key_mask + c0 : nullptr, n, x, mx);
    if (n % 32)  // the last P block's keys past n must be 0 in every row
      for (int64_t g = 0; g < G; ++g) std::fill(pb + g * kChunk + n, pb + g * kChunk + (n + 31) / 32 * 32, uint16_t{0});
    softmax_chunk(G, tiles, n, x, mx, pb, m, l, oacc);
    weighted_values_chunk(a, v + c0 * a.v_stride, n, pb, oacc);
  }
  _tile_release();
  for (int64_t g = 0; g < G; ++g) m[g] = partial_max(m[g], l[g]);  // a NaN score poisons the row
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int i = 0; i < 16; ++i) o[g * d + out_column(t / 2, static_cast<int>(t % 2), i)] = oacc[t][g * 16 + i];
}

}  // namespace amx
}  // namespace attn
}  // namespace idefics3_kit
#endif
