// bf16 non-causal (vision) attention on Intel AMX: a flash-attention loop with both matrix
// products on the tile unit, for head dims 32 and 64 (SigLIP at SmolVLM sizes: 64).
//
// Why: torch's CPU flash attention reaches ~0.4 TFLOP/s on SigLIP's 13 x 12 heads x 1024 x 1024
// scores at 2 threads, a third of the vision tower's time; the scores never need to leave the
// caches, and one TDPBF16PS does 16 x 16 x 32 multiply-adds.
//
// Per (batch, head): K and V are re-laid out once into the tile unit's pair layout (zero padded
// to a multiple of 32 keys), then per block of 16 queries and 32 keys:
//   S[16 q, 16 keys] = Q[16 q, 32 dims] . Kpairs[16 dim pairs, 16 keys x 2]   (x2 halves, x d/32 chunks)
//   softmax rows in fp32 (online, AVX-512), P rounded to bf16
//   O[16 q, 16 dims] += P[16 q, 32 keys] . Vpairs[16 key pairs, 16 dims x 2]  (d/16 tiles, kept in
//   tile registers for the whole row of key blocks)
// The running maximum is lazy (a row is rescaled only when a score passes its max by more than
// 2^8 in exp2 units, so unnormalized probabilities stay <= 256; exact in real arithmetic, the
// usual rounding otherwise). Scores stay fp32 (torch's flash kernel does the same; the bf16
// reference rounds them, so this is within the reference's own bf16 error).
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

namespace idefics3_kit {
namespace attn {
namespace vamx {

constexpr int64_t kQ = 16, kK = 32;  // queries and keys per block
constexpr float kLazy = 8.0f;        // rescale when a score passes the row max by more than this (log2 units)

inline bool usable(int64_t d) { return (d == 32 || d == 64) && idefics3_kit::amx::available(); }

// One (batch, head): rows of q/out `q_stride`/`o_stride` elements apart, of k/v `k_stride`/`v_stride`.
struct Head {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  int64_t lq, lk, d;
  int64_t q_stride, k_stride, v_stride, o_stride;
  const uint8_t* keep;  // [lk] 1 = attend (null: every key)
  float scale;
};

// Per-thread buffers, sized for the largest head seen.
struct Scratch {
  std::vector<uint16_t> kp, vp, qb, pb;
  std::vector<float> sb, ob, lv;
  std::vector<uint32_t> bits;
};

IK_AMX_FN inline void configure() {
  idefics3_kit::amx::TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // GCC 12 at -O2/-O3 drops these stores as dead (the intrinsic's asm reads the block through a
  // type it does not alias with), leaving an all-zero configuration: tile loads then fault.
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// 2^x for x <= ~9; very negative x gives 0 (scalef), -inf gives NaN (callers mask those keys).
// Degree 4 on [-0.5, 0.5]: relative error ~4e-5, far below the bf16 rounding the probabilities
// get next (2^-9).
IK_AMX_FN inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(9.6181291076284772e-3f);  // ln2^k / k!, k = 4 .. 0
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// K [lk, d] -> kp and V [lk, d] -> vp in the tile unit's pair layout, each tile's 16 rows of
// 64 bytes contiguous (1 KiB blocks: a tile load reads one block, not 16 rows 4 KiB apart, which
// all fall in one L1 set):
//   kp: per 16 keys, per 32-dim chunk c, per dim pair j: (key, dim 32c + 2j), (key, dim 32c + 2j + 1) for 16 keys
//   vp: per 32 keys, per 16-dim chunk, per key pair i: (key 2i, dim), (key 2i + 1, dim) for 16 dims
// Zero past lk (lkp keys).
IK_AMX_FN inline void pack_kv(const Head& h, int64_t lkp, uint16_t* kp, uint16_t* vp) {
  const int64_t d = h.d, chunks = d / 32;
  for (int64_t key = 0; key < lkp; ++key) {
    const uint16_t* row = h.k + key * h.k_stride;
    uint16_t* blk = kp + (key / 16) * chunks * 512 + (key % 16) * 2;
    for (int64_t e = 0; e < d; ++e) blk[(e / 32) * 512 + ((e % 32) / 2) * 32 + (e % 2)] = key < h.lk ? row[e] : 0;
  }
  for (int64_t key = 0; key < lkp; ++key) {
    const uint16_t* row = h.v + key * h.v_stride;
    uint16_t* blk = vp + (key / 32) * (d / 16) * 512 + ((key % 32) / 2) * 32 + (key % 2);
    for (int64_t e = 0; e < d; ++e) blk[(e / 16) * 512 + (e % 16) * 2] = key < h.lk ? row[e] : 0;
  }
}

// S for 16 keys (kb .. kb + 15) into rows of sb (row stride 32 floats).
template <int Chunks>
IK_AMX_FN inline void scores(const uint16_t* kp, int64_t kb, float* sb) {
  const uint16_t* blk = kp + (kb / 16) * Chunks * 512;
  _tile_zero(0);
  _tile_loadd(1, blk, 64);
  _tile_dpbf16ps(0, 2, 1);
  if constexpr (Chunks > 1) {
    _tile_loadd(1, blk + 512, 64);
    _tile_dpbf16ps(0, 3, 1);
  }
  _tile_stored(0, sb, kK * 4);
}

IK_AMX_FN inline void store_o(float* ob, int64_t d) {
  _tile_stored(4, ob, d * 4);
  _tile_stored(5, ob + 16, d * 4);
  if (d > 32) {
    _tile_stored(6, ob + 32, d * 4);
    _tile_stored(7, ob + 48, d * 4);
  }
}

IK_AMX_FN inline void load_o(const float* ob, int64_t d) {
  _tile_loadd(4, ob, d * 4);
  _tile_loadd(5, ob + 16, d * 4);
  if (d > 32) {
    _tile_loadd(6, ob + 32, d * 4);
    _tile_loadd(7, ob + 48, d * 4);
  }
}

// One head. The caller has configured the tiles (configure()) on this thread.
template <int Chunks>
IK_AMX_FN void run_head_t(const Head& h, Scratch& s) {
  const int64_t d = h.d, lkp = (h.lk + kK - 1) / kK * kK, blocks = lkp / kK;
  s.kp.resize(d * lkp), s.vp.resize(d * lkp), s.qb.resize(kQ * d), s.pb.resize(kQ * kK);
  s.sb.resize(kQ * kK), s.ob.resize(kQ * d), s.lv.resize(kQ * 16), s.bits.resize(blocks);
  pack_kv(h, lkp, s.kp.data(), s.vp.data());
  for (int64_t b = 0; b < blocks; ++b) {  // which keys of each block are attended to
    uint32_t m = 0;
    for (int64_t i = 0; i < kK; ++i) {
      const int64_t key = b * kK + i;
      if (key < h.lk && (h.keep == nullptr || h.keep[key])) m |= 1u << i;
    }
    s.bits[b] = m;
  }
  const float c = h.scale * 1.4426950408889634f;  // scores to log2 units
  float* sb = s.sb.data();
  float* ob = s.ob.data();
  float* lv = s.lv.data();
  for (int64_t q0 = 0; q0 < h.lq; q0 += kQ) {
    const int64_t nq = std::min(kQ, h.lq - q0);
    const uint16_t* qsrc = h.q + q0 * h.q_stride;
    int64_t qstride = h.q_stride;
    if (nq < kQ) {  // the last rows: zero padded (a tile load reads 16 rows)
      std::fill(s.qb.begin(), s.qb.end(), uint16_t{0});
      for (int64_t r = 0; r < nq; ++r) std::memcpy(&s.qb[r * d], qsrc + r * h.q_stride, d * 2);
      qsrc = s.qb.data();
      qstride = d;
    }
    _tile_loadd(2, qsrc, qstride * 2);
    if constexpr (Chunks > 1) _tile_loadd(3, qsrc + 32, qstride * 2);
    _tile_zero(4);
    _tile_zero(5);
    if constexpr (Chunks > 1) {
      _tile_zero(6);
      _tile_zero(7);
    }
    float mx[kQ];
    std::fill(mx, mx + kQ, -INFINITY);
    std::fill(lv, lv + kQ * 16, 0.0f);
    bool started = false;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint32_t bits = s.bits[b];
      if (bits == 0) continue;
      const int64_t kb = b * kK;
      scores<Chunks>(s.kp.data(), kb, sb);
      scores<Chunks>(s.kp.data(), kb + 16, sb + 16);
      const __mmask16 lo = static_cast<__mmask16>(bits), hi = static_cast<__mmask16>(bits >> 16);
      const bool all_kept = bits == ~uint32_t{0};
      const __m512 cv = _mm512_set1_ps(c);
      float alpha[kQ];
      bool rescale = false;
      for (int64_t r = 0; r < kQ; ++r) {
        const __m512 s0 = _mm512_loadu_ps(sb + r * kK), s1 = _mm512_loadu_ps(sb + r * kK + 16);
        alpha[r] = 1.0f;
        // raw scores against (max + lazy margin) / c: no multiply unless the max moves
        const __m512 limit = _mm512_set1_ps((mx[r] + kLazy) / c);
        if (_mm512_mask_cmp_ps_mask(lo, s0, limit, _CMP_GT_OQ) | _mm512_mask_cmp_ps_mask(hi, s1, limit, _CMP_GT_OQ)) {
          const float top = c * std::max(_mm512_mask_reduce_max_ps(lo, s0), _mm512_mask_reduce_max_ps(hi, s1));
          alpha[r] = mx[r] == -INFINITY ? 0.0f : std::exp2(mx[r] - top);
          mx[r] = top;
          rescale = true;
        }
        const __m512 m = _mm512_set1_ps(mx[r]);
        __m512 p0 = exp2_ps(_mm512_fmsub_ps(s0, cv, m)), p1 = exp2_ps(_mm512_fmsub_ps(s1, cv, m));
        if (!all_kept) {
          p0 = _mm512_maskz_mov_ps(lo, p0);
          p1 = _mm512_maskz_mov_ps(hi, p1);
        }
        __m512 l = _mm512_loadu_ps(lv + r * 16);
        if (alpha[r] != 1.0f) l = _mm512_mul_ps(l, _mm512_set1_ps(alpha[r]));
        _mm512_storeu_ps(lv + r * 16, _mm512_add_ps(l, _mm512_add_ps(p0, p1)));
        _mm512_storeu_si512(s.pb.data() + r * kK, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0)));
      }
      if (rescale && started) {  // rows whose max moved: their partial outputs shrink by alpha
        store_o(ob, d);
        for (int64_t r = 0; r < kQ; ++r)
          if (alpha[r] != 1.0f)
            for (int64_t e = 0; e < d; e += 16)
              _mm512_storeu_ps(ob + r * d + e, _mm512_mul_ps(_mm512_loadu_ps(ob + r * d + e), _mm512_set1_ps(alpha[r])));
        load_o(ob, d);
      }
      started = true;
      _tile_loadd(0, s.pb.data(), kK * 2);
      const uint16_t* vblk = s.vp.data() + (kb / 32) * (d / 16) * 512;
      _tile_loadd(1, vblk, 64);
      _tile_dpbf16ps(4, 0, 1);
      _tile_loadd(1, vblk + 512, 64);
      _tile_dpbf16ps(5, 0, 1);
      if constexpr (Chunks > 1) {
        _tile_loadd(1, vblk + 1024, 64);
        _tile_dpbf16ps(6, 0, 1);
        _tile_loadd(1, vblk + 1536, 64);
        _tile_dpbf16ps(7, 0, 1);
      }
    }
    store_o(ob, d);
    for (int64_t r = 0; r < nq; ++r) {
      const float l = _mm512_reduce_add_ps(_mm512_loadu_ps(lv + r * 16));
      const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
      uint16_t* o = h.out + (q0 + r) * h.o_stride;
      for (int64_t e = 0; e < d; e += 32) {
        const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(ob + r * d + e), inv);
        const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(ob + r * d + e + 16), inv);
        _mm512_storeu_si512(o + e, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a)));
      }
    }
  }
}

IK_AMX_FN inline void run_head(const Head& h, Scratch& s) {
  if (h.d == 64)
    run_head_t<2>(h, s);
  else
    run_head_t<1>(h, s);
}

IK_AMX_FN inline void release() { _tile_release(); }

}  // namespace vamx
}  // namespace attn
}  // namespace idefics3_kit
#endif
