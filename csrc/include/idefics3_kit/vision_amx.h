// bf16 attention on Intel AMX, non-causal (vision) and causal (prefill): a flash-attention loop
// with both matrix products on the tile unit, for head dims 8 to 128 in steps of 8 (SigLIP at
// SmolVLM-256M/500M sizes: 64; SigLIP-so400m in SmolVLM-2.2B and Idefics3-8B: 72).
//
// Why: torch's CPU flash attention reaches ~0.4 TFLOP/s on SigLIP's 13 x 12 heads x 1024 x 1024
// scores at 2 threads, a third of the vision tower's time; the scores never need to leave the
// caches, and one TDPBF16PS does 16 x 16 x 32 multiply-adds.
//
// Per (batch, head): K and V are re-laid out once into the tile unit's pair layout (zero padded
// to a multiple of 32 keys, and K's dims to a multiple of 32, V's to a multiple of 16), then per
// block of 16 queries and 32 keys:
//   S[16 q, 16 keys] = Q[16 q, 32 dims] . Kpairs[16 dim pairs, 16 keys x 2]   (x2 halves, x C = ceil(d/32) chunks)
//   softmax rows in fp32 (online, AVX-512), P rounded to bf16
//   O[16 q, 16 dims] += P[16 q, 32 keys] . Vpairs[16 key pairs, 16 dims x 2]  (T = ceil(d/16) tiles)
// Eight tile registers hold it (Layout below): tile 0 the scores then the probabilities, tile 1
// the K or V block, then Q's C chunks and the T output accumulators when they fit (d <= 64);
// above that Q is reloaded from the L1 per chunk so five accumulators fit in tiles, and past 80
// dims the rest live in an fp32 buffer (L1), each staged through a tile for its product.
// The blocks are software pipelined: the next block's scores are computed (and stored) before
// this block's softmax reads its own, and a block's P.V runs after the next block's softmax, so
// no vector load waits for a tile store just issued and no tile load for vector stores just
// issued (neither forwards to the other). The arithmetic and its order are the unpipelined
// loop's: outputs are bit-identical. 5-10% faster (one thread, d = 32 / 64 / 72; 2% at d = 128).
// The running maximum is lazy (a row is rescaled only when a score passes its max by more than
// 2^8 in exp2 units, so unnormalized probabilities stay <= 256; exact in real arithmetic, the
// usual rounding otherwise). Scores stay fp32 (torch's flash kernel does the same; the bf16
// reference rounds them, so this is within the reference's own bf16 error).
//
// Causal mode (Head::causal, the decoder's prefill through prefill_attention): query row i sits at
// key position lk - lq + i. A block of 16 queries skips the key blocks past its last row's
// position, and the key blocks across the diagonal get a key mask per row (keys_up_to); the loop
// is otherwise the same. A row with no key to attend to (left padding) is written as zeros.
//
// Keys and values must be finite (the caller checks and otherwise runs the kernel that follows
// attention_ref's NaN rules); a NaN or infinite query makes its own row NaN, as in the reference.
// Masked keys get probability exactly 0.
#pragma once

#include "amx.h"

#ifdef IK_HAVE_AMX_PATH
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16.h"
#include "flash_common.h"

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace attn {
namespace vamx {

constexpr int64_t kQ = 16, kK = 32;  // queries and keys per block
constexpr float kLazy = 8.0f;        // rescale when a score passes the row max by more than this (log2 units)
constexpr int64_t kMaxDim = 128;

inline bool usable(int64_t d) { return d >= 8 && d <= kMaxDim && d % 8 == 0 && idefics3_kit::amx::available(); }

using flash::Head;  // (flash_common.h: the per-head arguments both CPU flash kernels take)

// Per-thread buffers, sized for the largest head seen.
struct Scratch {
  std::vector<uint16_t> kp, vp, qb, pb;
  std::vector<float> sb, ob, lv;
  std::vector<uint32_t> bits;
  std::vector<int64_t> kept;
};

// Where a head of C 32-dim chunks (scores) and T 16-dim output tiles keeps things. Tiles 0 (scores,
// then probabilities) and 1 (the K or V block) always; then Q's chunks in tiles 2.. and the output
// accumulators after them when both fit (d <= 64), else Q reloaded through tile 2 per chunk and
// the first five accumulators in tiles 3..7; the ones past those (d > 80) live in the fp32 output
// buffer and are staged through tile 2 (free while the outputs accumulate).
template <int C, int T>
struct Layout {
  static constexpr int64_t kDq = 32 * C;  // q and k dims in the packed layouts (zero padded)
  static constexpr int64_t kDo = 16 * T;  // v and output dims in the packed layouts (zero padded)
  static constexpr bool kQInTiles = 2 + C + T <= 8;
  static constexpr int kTileO = kQInTiles ? 2 + C : 3;             // the first accumulator
  static constexpr int kOTiles = kQInTiles ? T : std::min(T, 5);   // accumulators held in tiles
  static constexpr int kTileStage = 2;                             // for the ones in the buffer
};

IK_AMX_FN inline void configure() {
  idefics3_kit::amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // GCC 12 at -O2/-O3 drops these stores as dead (the intrinsic's asm reads the block through a
  // type it does not alias with), leaving an all-zero configuration: tile loads then fault.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// The tile intrinsics paste their register number into the instruction text, so it must be a
// literal: these switch on it (constant after inlining, so the switch folds away).
#define IK_TILE_SWITCH(t, STMT) \
  switch (t) {                  \
    case 0: STMT(0); break;     \
    case 1: STMT(1); break;     \
    case 2: STMT(2); break;     \
    case 3: STMT(3); break;     \
    case 4: STMT(4); break;     \
    case 5: STMT(5); break;     \
    case 6: STMT(6); break;     \
    default: STMT(7); break;    \
  }
IK_AMX_FN inline void tile_load(int t, const void* p, int64_t stride_bytes) {
#define IK_LOAD(n) _tile_loadd(n, p, stride_bytes)
  IK_TILE_SWITCH(t, IK_LOAD)
#undef IK_LOAD
}
IK_AMX_FN inline void tile_store(int t, void* p, int64_t stride_bytes) {
#define IK_STORE(n) _tile_stored(n, p, stride_bytes)
  IK_TILE_SWITCH(t, IK_STORE)
#undef IK_STORE
}
IK_AMX_FN inline void tile_zero(int t) {
#define IK_ZERO(n) _tile_zero(n)
  IK_TILE_SWITCH(t, IK_ZERO)
#undef IK_ZERO
}
#undef IK_TILE_SWITCH
// tile 0 += tile q . tile 1 (scores; q in 2..5), and tile o += tile 0 . tile 1 (outputs; o in 2..7).
// Only those registers are spelled out: the assembler refuses a product whose tiles are not distinct,
// and an unoptimized build emits every case.
IK_AMX_FN inline void dp_scores(int q) {
  switch (q) {
    case 2: _tile_dpbf16ps(0, 2, 1); break;
    case 3: _tile_dpbf16ps(0, 3, 1); break;
    case 4: _tile_dpbf16ps(0, 4, 1); break;
    default: _tile_dpbf16ps(0, 5, 1); break;
  }
}
IK_AMX_FN inline void dp_output(int o) {
  switch (o) {
    case 2: _tile_dpbf16ps(2, 0, 1); break;
    case 3: _tile_dpbf16ps(3, 0, 1); break;
    case 4: _tile_dpbf16ps(4, 0, 1); break;
    case 5: _tile_dpbf16ps(5, 0, 1); break;
    case 6: _tile_dpbf16ps(6, 0, 1); break;
    default: _tile_dpbf16ps(7, 0, 1); break;
  }
}

using flash::exp2_ps;
using flash::transpose_16x16;

// K [lk, d] -> kp and V [lk, d] -> vp in the tile unit's pair layout, each tile's 16 rows of
// 64 bytes contiguous (1 KiB blocks: a tile load reads one block, not 16 rows 4 KiB apart, which
// all fall in one L1 set):
//   kp: per 16 keys, per 32-dim chunk c < C, per dim pair j: (key, dim 32c + 2j), (key, dim 32c + 2j + 1) for 16 keys
//       (a 16 x 16 transpose of the block's dim pairs, as 32-bit words)
//   vp: per 32 keys, per 16-dim chunk t < T, per key pair i: (key 2i, dim), (key 2i + 1, dim) for 16 dims
//       (two rows' 16 dims interleaved)
// Zero past lk (lkp keys) and past d (masked loads read nothing there).
template <int C, int T>
IK_AMX_FN inline void pack_kv(const Head& h, int64_t lkp, uint16_t* kp, uint16_t* vp) {
  const int64_t d = h.d;
  auto dims = [d](int64_t from, int64_t n) { return flash::dim_lanes(d, from, n); };
  for (int64_t kb = 0; kb < lkp; kb += 16) {
    for (int c = 0; c < C; ++c) {
      const __mmask32 m = dims(32 * c, 32);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = kb + i < h.lk ? _mm512_maskz_loadu_epi16(m, h.k + (kb + i) * h.k_stride + 32 * c) : _mm512_setzero_si512();
      transpose_16x16(r);
      uint16_t* blk = kp + (kb / 16) * C * 512 + c * 512;
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(blk + j * 32, r[j]);
    }
  }
  for (int64_t key = 0; key < lkp; key += 2) {
    uint16_t* blk = vp + (key / 32) * T * 512 + ((key % 32) / 2) * 32;
    for (int t = 0; t < T; ++t) {
      const __mmask16 m = static_cast<__mmask16>(dims(16 * t, 16));
      const __m256i a = key < h.lk ? _mm256_maskz_loadu_epi16(m, h.v + key * h.v_stride + 16 * t) : _mm256_setzero_si256();
      const __m256i b =
          key + 1 < h.lk ? _mm256_maskz_loadu_epi16(m, h.v + (key + 1) * h.v_stride + 16 * t) : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(blk + t * 512, pair);
    }
  }
}

// S for 16 keys (kb .. kb + 15) into rows of sb (row stride 32 floats). q: the block's 16 query
// rows (q_stride elements apart, kDq dims), read when Q is not kept in tiles.
template <int C, int T>
IK_AMX_FN inline void scores(const uint16_t* kp, int64_t kb, const uint16_t* q, int64_t q_stride, float* sb) {
  using L = Layout<C, T>;
  const uint16_t* blk = kp + (kb / 16) * C * 512;
  _tile_zero(0);
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    if constexpr (!L::kQInTiles) tile_load(2, q + 32 * c, q_stride * 2);
    tile_load(1, blk + c * 512, 64);
    dp_scores(L::kQInTiles ? 2 + c : 2);
  }
  _tile_stored(0, sb, kK * 4);
}

// Half i % 2 of a double buffer of kQ x kK entries (sb's scores, pb's probabilities): block
// kept[i] of the pipeline uses it.
template <typename E>
inline E* half(E* base, int64_t i) { return base + (i & 1) * kQ * kK; }

// The 16 x 32 scores of block kept[i] into its half of s.sb.
template <int C, int T>
IK_AMX_FN inline void block_scores(Scratch& s, int64_t i, const uint16_t* q, int64_t q_stride) {
  const int64_t kb = s.kept[i] * kK;
  scores<C, T>(s.kp.data(), kb, q, q_stride, half(s.sb.data(), i));
  scores<C, T>(s.kp.data(), kb + 16, q, q_stride, half(s.sb.data(), i) + 16);
}

// The accumulators held in tiles to / from their columns of ob (kDo floats per row).
template <int C, int T>
IK_AMX_FN inline void store_o(float* ob) {
#pragma GCC unroll 8
  for (int t = 0; t < Layout<C, T>::kOTiles; ++t) tile_store(Layout<C, T>::kTileO + t, ob + 16 * t, Layout<C, T>::kDo * 4);
}

template <int C, int T>
IK_AMX_FN inline void load_o(const float* ob) {
#pragma GCC unroll 8
  for (int t = 0; t < Layout<C, T>::kOTiles; ++t) tile_load(Layout<C, T>::kTileO + t, ob + 16 * t, Layout<C, T>::kDo * 4);
}

// O += P . V for the 32 keys at kb (P in pb, bf16 [16, 32]).
template <int C, int T>
IK_AMX_FN inline void accumulate(const uint16_t* pb, const uint16_t* vp, int64_t kb, float* ob) {
  using L = Layout<C, T>;
  _tile_loadd(0, pb, kK * 2);
  const uint16_t* vblk = vp + (kb / 32) * T * 512;
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    tile_load(1, vblk + t * 512, 64);
    if (t < L::kOTiles) {
      dp_output(L::kTileO + t);
    } else {
      tile_load(L::kTileStage, ob + 16 * t, L::kDo * 4);
      dp_output(L::kTileStage);
      tile_store(L::kTileStage, ob + 16 * t, L::kDo * 4);
    }
  }
}

// The first n of 32 keys (n clamped to 0 .. 32) as mask bits.
inline uint32_t keys_up_to(int64_t last) {
  return last >= kK - 1 ? ~uint32_t{0} : last < 0 ? 0u : (uint32_t{1} << (last + 1)) - 1;
}

// How many of the first nkept kept blocks hold a key at or before `last` (they are in order).
inline int64_t visible_blocks(const Scratch& s, int64_t nkept, int64_t last) {
  return std::upper_bound(s.kept.begin(), s.kept.begin() + nkept, last < 0 ? int64_t{-1} : last / kK) - s.kept.begin();
}

// One head. The caller has configured the tiles (configure()) on this thread.
template <int C, int T>
IK_AMX_FN void run_head_t(const Head& h, Scratch& s) {
  using L = Layout<C, T>;
  constexpr int64_t dq = L::kDq, dout = L::kDo;
  const int64_t d = h.d, lkp = (h.lk + kK - 1) / kK * kK, blocks = lkp / kK;
  s.kp.resize(dq * lkp), s.vp.resize(dout * lkp), s.qb.resize(kQ * dq), s.pb.resize(2 * kQ * kK);
  s.sb.resize(2 * kQ * kK), s.ob.resize(kQ * dout), s.lv.resize(kQ * 16), s.bits.resize(blocks), s.kept.resize(blocks);
  pack_kv<C, T>(h, lkp, s.kp.data(), s.vp.data());
  for (int64_t b = 0; b < blocks; ++b) {  // which keys of each block are attended to
    uint32_t m = 0;
    for (int64_t i = 0; i < kK; ++i) {
      const int64_t key = b * kK + i;
      if (key < h.lk && (h.keep == nullptr || h.keep[key])) m |= 1u << i;
    }
    s.bits[b] = m;
  }
  int64_t nkept = 0;  // the blocks with a key to attend to, in order
  for (int64_t b = 0; b < blocks; ++b)
    if (s.bits[b]) s.kept[nkept++] = b;
  const float c = h.scale * 1.4426950408889634f;  // scores to log2 units
  float* sb = s.sb.data();
  float* ob = s.ob.data();
  float* lv = s.lv.data();
  for (int64_t q0 = 0; q0 < h.lq; q0 += kQ) {
    const int64_t nq = std::min(kQ, h.lq - q0);
    // causal: row r sees keys up to first_limit + r; the blocks past the last row's limit are
    // skipped, and the blocks past the first row's limit get a mask per row
    const int64_t first_limit = h.lk - h.lq + q0;
    const int64_t nkept_q = h.causal ? visible_blocks(s, nkept, first_limit + nq - 1) : nkept;
    const uint16_t* qsrc = h.q + q0 * h.q_stride;
    int64_t qstride = h.q_stride;
    if (nq < kQ || d < dq) {  // the last rows, or dims past d: zero padded (a tile load reads 16 rows of 64 bytes)
      std::fill(s.qb.begin(), s.qb.end(), uint16_t{0});
      for (int64_t r = 0; r < nq; ++r) std::memcpy(&s.qb[r * dq], qsrc + r * h.q_stride, d * 2);
      qsrc = s.qb.data();
      qstride = dq;
    }
    if constexpr (L::kQInTiles) {
#pragma GCC unroll 4
      for (int ch = 0; ch < C; ++ch) tile_load(2 + ch, qsrc + 32 * ch, qstride * 2);
    }
#pragma GCC unroll 8
    for (int t = 0; t < L::kOTiles; ++t) tile_zero(L::kTileO + t);
    if constexpr (L::kOTiles < T) std::fill(ob, ob + kQ * dout, 0.0f);
    float mx[kQ];
    std::fill(mx, mx + kQ, -INFINITY);
    std::fill(lv, lv + kQ * 16, 0.0f);
    bool started = false;
    // the pipeline (see the top of the file): block kept[i + 1]'s scores go into the other half
    // of sb before block kept[i]'s softmax; block kept[i]'s P (in half i & 1 of pb) meets V after
    // block kept[i + 1]'s softmax
    if (nkept_q > 0) block_scores<C, T>(s, 0, qsrc, qstride);
    for (int64_t i = 0; i < nkept_q; ++i) {
      const int64_t key0 = s.kept[i] * kK;
      const uint32_t block_bits = s.bits[s.kept[i]];
      const bool diagonal = h.causal && key0 + kK - 1 > first_limit;  // a row of the block misses some key
      const float* sb_cur = half(sb, i);
      if (i + 1 < nkept_q) block_scores<C, T>(s, i + 1, qsrc, qstride);
      uint16_t* pb_cur = half(s.pb.data(), i);
      const __m512 cv = _mm512_set1_ps(c), lazy = _mm512_set1_ps(kLazy);
      float alpha[kQ];
      bool rescale = false;
      for (int64_t r = 0; r < kQ; ++r) {
        const uint32_t bits = diagonal ? block_bits & keys_up_to(first_limit + r - key0) : block_bits;
        const __mmask16 lo = static_cast<__mmask16>(bits), hi = static_cast<__mmask16>(bits >> 16);
        const bool all_kept = bits == ~uint32_t{0};
        const __m512 s0 = _mm512_loadu_ps(sb_cur + r * kK), s1 = _mm512_loadu_ps(sb_cur + r * kK + 16);
        alpha[r] = 1.0f;
        // scores in log2 units past the row max; a kept one above the lazy margin moves the max
        __m512 x0 = _mm512_fmsub_ps(s0, cv, _mm512_set1_ps(mx[r])), x1 = _mm512_fmsub_ps(s1, cv, _mm512_set1_ps(mx[r]));
        if (_mm512_mask_cmp_ps_mask(lo, x0, lazy, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(hi, x1, lazy, _CMP_GT_OQ)) {
          const float top = c * std::max(_mm512_mask_reduce_max_ps(lo, s0), _mm512_mask_reduce_max_ps(hi, s1));
          alpha[r] = mx[r] == -INFINITY ? 0.0f : std::exp2(mx[r] - top);
          mx[r] = top;
          rescale = true;
          x0 = _mm512_fmsub_ps(s0, cv, _mm512_set1_ps(top));
          x1 = _mm512_fmsub_ps(s1, cv, _mm512_set1_ps(top));
        }
        __m512 p0 = exp2_ps(x0), p1 = exp2_ps(x1);
        if (!all_kept) {
          p0 = _mm512_maskz_mov_ps(lo, p0);
          p1 = _mm512_maskz_mov_ps(hi, p1);
        }
        __m512 l = _mm512_loadu_ps(lv + r * 16);
        if (alpha[r] != 1.0f) l = _mm512_mul_ps(l, _mm512_set1_ps(alpha[r]));
        _mm512_storeu_ps(lv + r * 16, _mm512_add_ps(l, _mm512_add_ps(p0, p1)));
        _mm512_storeu_si512(pb_cur + r * kK, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0)));
      }
      if (i > 0)  // the previous block's P.V, before any rescale (the order of the unpipelined loop)
        accumulate<C, T>(half(s.pb.data(), i - 1), s.vp.data(), s.kept[i - 1] * kK, ob);
      if (rescale && started) {  // rows whose max moved: their partial outputs shrink by alpha
        store_o<C, T>(ob);
        for (int64_t r = 0; r < kQ; ++r)
          if (alpha[r] != 1.0f)
            for (int64_t e = 0; e < dout; e += 16)
              _mm512_storeu_ps(ob + r * dout + e, _mm512_mul_ps(_mm512_loadu_ps(ob + r * dout + e), _mm512_set1_ps(alpha[r])));
        load_o<C, T>(ob);
      }
      started = true;
    }
    if (nkept_q > 0) accumulate<C, T>(half(s.pb.data(), nkept_q - 1), s.vp.data(), s.kept[nkept_q - 1] * kK, ob);
    store_o<C, T>(ob);
    for (int64_t r = 0; r < nq; ++r) {
      const float l = _mm512_reduce_add_ps(_mm512_loadu_ps(lv + r * 16));
      const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
      uint16_t* o = h.out + (q0 + r) * h.o_stride;
      for (int64_t e = 0; e < d; e += 16) {  // 16 outputs at a time, the last 8 masked when d % 16 == 8
        const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(ob + r * dout + e), inv));
        const __mmask16 keep = d - e >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (d - e)) - 1);
        _mm256_mask_storeu_epi16(o + e, keep, reinterpret_cast<__m256i>(y));
      }
    }
  }
}

IK_AMX_FN inline void run_head(const Head& h, Scratch& s) {
  switch ((h.d + 15) / 16) {  // output tiles T; score chunks C = ceil(T / 2)
    case 1: run_head_t<1, 1>(h, s); break;
    case 2: run_head_t<1, 2>(h, s); break;
    case 3: run_head_t<2, 3>(h, s); break;
    case 4: run_head_t<2, 4>(h, s); break;
    case 5: run_head_t<3, 5>(h, s); break;
    case 6: run_head_t<3, 6>(h, s); break;
    case 7: run_head_t<4, 7>(h, s); break;
    default: run_head_t<4, 8>(h, s); break;
  }
}

IK_AMX_FN inline void release() { _tile_release(); }

}  // namespace vamx
}  // namespace attn
}  // namespace idefics3_kit

IK_INTRINSICS_END
#endif
