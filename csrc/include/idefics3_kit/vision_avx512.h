// bf16 attention with AVX-512 BF16 dot products (VDPBF16PS), non-causal (vision) and causal
// (prefill): the flash-attention loop of vision_amx.h for CPUs without a tile unit (AMD Zen 4,
// Intel Cooper Lake), head dims 8 to 128 in steps of 8.
//
// Why: on a Zen 4 without AMX the non-causal bf16 calls went to the blocked kernel (oneDNN GEMMs
// around an fp32 softmax pass, scores and probabilities through memory): 286-290 GFLOP/s on
// SigLIP's tiles at 2 threads, against ~470 GFLOP/s of VDPBF16PS (one 512-bit instruction a cycle
// per core); the tower's attention was ~1.8 s of its ~7.8. Here the scores of a block never leave
// the L1.
//
// Per (batch, head): K and V are re-laid out once (zero padded to a multiple of 64 keys):
//   kp: per 16 keys, per dim pair p < d / 2: (key, dim 2p), (key, dim 2p + 1) for the 16 keys
//   vp: per key pair i, per 16-dim chunk t < T: (key 2i, dim), (key 2i + 1, dim) for 16 dims
// so that one VDPBF16PS with a broadcast pair of Q (or of P) adds two products into 16 scores (or
// 16 outputs). Then per block of kRows = 12 queries and kKeys = 64 keys:
//   S[12, 64]  = Q . K^T: 12 rows x 32 keys in 24 registers, one dim pair per step
//   softmax rows in fp32 (online, lazy maximum as in vision_amx.h), P rounded to bf16
//   O[12, 16T] = O * alpha + P . V: R rows x T chunks in registers (R T <= 24), one key pair per step
// The scores (3 KiB), P (1.5 KiB) and O (fp32, up to 6 KiB) stay in the L1; K and V blocks of
// 64 keys (8 KiB each at d = 64) are re-read per block of queries from the L2.
//
// Scores stay fp32, as in the AMX kernel (the bf16 reference rounds them; within its own error).
// Keys and values must be finite (the caller checks, as for the AMX kernel); a NaN or infinite
// query makes its own row NaN. Masked keys get probability exactly 0; a row with no key to attend
// to is written as zeros.
#pragma once

#include "flash_common.h"

#ifdef IK_HAVE_FLASH_AVX512
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

IK_INTRINSICS_BEGIN  // (pillow_resample.h says why)

namespace idefics3_kit {
namespace attn {
namespace vavx {

using flash::Head;

constexpr int64_t kRows = 12;  // queries per block
constexpr int64_t kKeys = 64;  // keys per block
constexpr float kLazy = 8.0f;  // rescale when a score passes the row max by more than this (log2 units)
constexpr int64_t kMaxDim = 128;

// The CPU has AVX-512 BF16; IDEFICS3_KIT_NO_FLASH=1 turns this kernel off (comparisons with the
// blocked kernel, debugging).
inline bool available() {
  static const bool ok = [] {
    const char* off = std::getenv("IDEFICS3_KIT_NO_FLASH");
    if (off && *off && *off != '0') return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

inline bool usable(int64_t d) { return d >= 8 && d <= kMaxDim && d % 8 == 0 && available(); }

// Per-thread buffers, sized for the largest head seen.
struct Scratch {
  std::vector<uint16_t> kp, vp, qb, pb;
  std::vector<float> sb, ob, lv;
  std::vector<uint64_t> bits;
  std::vector<int64_t> kept;
};

// K and V of one head into kp and vp (layouts at the top), zero past lk (lkp keys) and past d.
template <int T>
IK_FLASH_FN inline void pack_kv(const Head& h, int64_t lkp, uint16_t* kp, uint16_t* vp) {
  const int64_t d = h.d, pairs = d / 2;
  for (int64_t kb = 0; kb < lkp; kb += 16) {
    uint16_t* group = kp + kb * d;  // 16 keys x d dims
    for (int64_t c = 0; 32 * c < d; ++c) {
      const __mmask32 m = flash::dim_lanes(d, 32 * c, 32);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = kb + i < h.lk ? _mm512_maskz_loadu_epi16(m, h.k + (kb + i) * h.k_stride + 32 * c) : _mm512_setzero_si512();
      flash::transpose_16x16(r);
      const int64_t chunk_pairs = std::min<int64_t>(16, pairs - 16 * c);
      for (int64_t j = 0; j < chunk_pairs; ++j) _mm512_storeu_si512(group + (16 * c + j) * 32, r[j]);
    }
  }
  for (int64_t key = 0; key < lkp; key += 2) {
    uint16_t* pair_row = vp + (key / 2) * T * 32;
    for (int t = 0; t < T; ++t) {
      const __mmask16 m = static_cast<__mmask16>(flash::dim_lanes(d, 16 * t, 16));
      const __m256i a = key < h.lk ? _mm256_maskz_loadu_epi16(m, h.v + key * h.v_stride + 16 * t) : _mm256_setzero_si256();
      const __m256i b =
          key + 1 < h.lk ? _mm256_maskz_loadu_epi16(m, h.v + (key + 1) * h.v_stride + 16 * t) : _mm256_setzero_si256();
      const __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
      _mm512_storeu_si512(pair_row + t * 32, pair);
    }
  }
}

// acc + the pairwise products of b with the two bf16 at p (one 32-bit word broadcast to every
// lane). GCC emits the broadcast as its own load (VPBROADCASTD); the embedded broadcast
// ({1to16}) of VDPBF16PS saves it: the score products 4% faster (one thread, d = 64).
IK_FLASH_FN inline __m512 dp_pair(__m512 acc, const uint16_t* p, __m512bh b) {
#if defined(__clang__)
  int32_t w;
  std::memcpy(&w, p, 4);
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_set1_epi32(w)), b);
#else
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(b), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
#endif
}

// S[kRows, 32] for the 32 keys of the two 16-key groups at k0 / k1 (packed) into sb (row stride
// kKeys). q: kRows query rows, kQStride elements apart.
template <int64_t kQStride>
IK_FLASH_FN inline void scores32(const uint16_t* q, const uint16_t* k0, const uint16_t* k1, int64_t pairs, float* sb) {
  __m512 acc[kRows][2];
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh a = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k0 + p * 32));
    const __m512bh b = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k1 + p * 32));
#pragma GCC unroll 12
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = dp_pair(acc[r][0], q + r * kQStride + 2 * p, a);
      acc[r][1] = dp_pair(acc[r][1], q + r * kQStride + 2 * p, b);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(sb + r * kKeys, acc[r][0]);
    _mm512_storeu_ps(sb + r * kKeys + 16, acc[r][1]);
  }
}

// Rows of the O accumulation held in registers at once: R x T accumulators, at most 24 (kRows
// is a multiple of each).
constexpr int pv_rows(int t) { return t <= 2 ? 12 : t <= 4 ? 6 : t <= 6 ? 4 : 3; }

// O[R rows] = O * alpha + P . V over one block's kKeys / 2 key pairs. o: fp32 rows of 16 T; p: bf16
// rows of kKeys; vblk: the block's packed V.
template <int T, int R>
IK_FLASH_FN inline void accumulate_rows(const uint16_t* p, const uint16_t* vblk, float* o, const float* alpha) {
  __m512 acc[R][T];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_mul_ps(_mm512_loadu_ps(o + (r * T + t) * 16), a);
  }
  for (int64_t i = 0; i < kKeys / 2; ++i) {
    __m512bh v[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) v[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(vblk + (i * T + t) * 32));
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = dp_pair(acc[r][t], p + r * kKeys + 2 * i, v[t]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) _mm512_storeu_ps(o + (r * T + t) * 16, acc[r][t]);
}

// The first n of 64 keys (n = last + 1, clamped to 0 .. 64) as mask bits.
inline uint64_t keys_up_to(int64_t last) {
  return last >= kKeys - 1 ? ~uint64_t{0} : last < 0 ? 0u : (uint64_t{1} << (last + 1)) - 1;
}

// Softmax of one block's rows: scores sb [kRows, kKeys] -> probabilities pb (bf16, unnormalized,
// <= 2^kLazy), the running max mx (log2 units), the per-lane sums lv [kRows, 16] and each row's
// rescale factor alpha. bits(r): the row's attended keys of the block.
template <typename Bits>
IK_FLASH_FN inline void softmax_block(const float* sb, uint16_t* pb, float* mx, float* lv, float* alpha, float c,
                                      Bits bits_of_row) {
  const __m512 cv = _mm512_set1_ps(c), lazy = _mm512_set1_ps(kLazy);
  for (int64_t r = 0; r < kRows; ++r) {
    const uint64_t bits = bits_of_row(r);
    __mmask16 m[4];
    __m512 s[4], x[4];
    __mmask16 over = 0;
    for (int j = 0; j < 4; ++j) {
      m[j] = static_cast<__mmask16>(bits >> (16 * j));
      s[j] = _mm512_loadu_ps(sb + r * kKeys + 16 * j);
      x[j] = _mm512_fmsub_ps(s[j], cv, _mm512_set1_ps(mx[r]));  // log2 units past the row max
      over |= _mm512_mask_cmp_ps_mask(m[j], x[j], lazy, _CMP_GT_OQ);
    }
    alpha[r] = 1.0f;
    if (over) {  // a kept score passed the lazy margin: move the max to the block's top
      float top = -INFINITY;
      for (int j = 0; j < 4; ++j) top = std::max(top, _mm512_mask_reduce_max_ps(m[j], s[j]));
      top *= c;
      alpha[r] = mx[r] == -INFINITY ? 0.0f : std::exp2(mx[r] - top);
      mx[r] = top;
      for (int j = 0; j < 4; ++j) x[j] = _mm512_fmsub_ps(s[j], cv, _mm512_set1_ps(top));
    }
    __m512 p[4];
    for (int j = 0; j < 4; ++j) {
      p[j] = flash::exp2_ps(x[j]);
      if (bits != ~uint64_t{0}) p[j] = _mm512_maskz_mov_ps(m[j], p[j]);
    }
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3]));
    _mm512_storeu_ps(lv + r * 16, _mm512_fmadd_ps(_mm512_loadu_ps(lv + r * 16), _mm512_set1_ps(alpha[r]), sum));
    _mm512_storeu_si512(pb + r * kKeys, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p[1], p[0])));
    _mm512_storeu_si512(pb + r * kKeys + 32, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p[3], p[2])));
  }
}

// Outputs of a block of nq queries: O / l, rounded to bf16, d dims per row.
IK_FLASH_FN inline void write_rows(const Head& h, int64_t q0, int64_t nq, const float* ob, const float* lv,
                                   int64_t dout) {
  for (int64_t r = 0; r < nq; ++r) {
    const float l = _mm512_reduce_add_ps(_mm512_loadu_ps(lv + r * 16));
    const __m512 inv = _mm512_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
    uint16_t* o = h.out + (q0 + r) * h.o_stride;
    for (int64_t e = 0; e < h.d; e += 16) {  // the last 8 masked when d % 16 == 8
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(ob + r * dout + e), inv));
      const __mmask16 keep = h.d - e >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (h.d - e)) - 1);
      _mm256_mask_storeu_epi16(o + e, keep, reinterpret_cast<__m256i>(y));
    }
  }
}

// One head, T = ceil(d / 16) output chunks.
template <int T>
IK_FLASH_FN void run_head_t(const Head& h, Scratch& s) {
  constexpr int64_t dout = 16 * T;
  constexpr int R = pv_rows(T);
  const int64_t d = h.d, pairs = d / 2, lkp = (h.lk + kKeys - 1) / kKeys * kKeys, blocks = lkp / kKeys;
  s.kp.resize(d * lkp), s.vp.resize(dout * lkp), s.qb.resize(kRows * dout), s.pb.resize(kRows * kKeys);
  s.sb.resize(kRows * kKeys), s.ob.resize(kRows * dout), s.lv.resize(kRows * 16), s.bits.resize(blocks);
  s.kept.resize(blocks);
  pack_kv<T>(h, lkp, s.kp.data(), s.vp.data());
  int64_t nkept = 0;  // the blocks with a key to attend to, in order
  for (int64_t b = 0; b < blocks; ++b) {
    uint64_t m = 0;
    for (int64_t i = 0; i < kKeys; ++i) {
      const int64_t key = b * kKeys + i;
      if (key < h.lk && (h.keep == nullptr || h.keep[key])) m |= uint64_t{1} << i;
    }
    s.bits[b] = m;
    if (m) s.kept[nkept++] = b;
  }
  const float c = h.scale * 1.4426950408889634f;  // scores to log2 units
  float *sb = s.sb.data(), *ob = s.ob.data(), *lv = s.lv.data();
  for (int64_t q0 = 0; q0 < h.lq; q0 += kRows) {
    const int64_t nq = std::min(kRows, h.lq - q0);
    const int64_t first_limit = h.lk - h.lq + q0;  // causal: row r sees keys up to first_limit + r
    // the block's query rows, copied dout elements apart (the last block zero padded): the score
    // products then address them as one base plus constant offsets instead of 12 row pointers
    if (nq < kRows) std::fill(s.qb.begin(), s.qb.end(), uint16_t{0});
    for (int64_t r = 0; r < nq; ++r) std::memcpy(&s.qb[r * dout], h.q + (q0 + r) * h.q_stride, d * 2);
    std::fill(ob, ob + kRows * dout, 0.0f);
    std::fill(lv, lv + kRows * 16, 0.0f);
    float mx[kRows], alpha[kRows];
    std::fill(mx, mx + kRows, -INFINITY);
    for (int64_t i = 0; i < nkept; ++i) {
      const int64_t b = s.kept[i], key0 = b * kKeys;
      if (h.causal && key0 > first_limit + nq - 1) break;  // past every row's position (blocks are in order)
      const uint16_t* kblk = s.kp.data() + key0 * d;
      scores32<dout>(s.qb.data(), kblk, kblk + 16 * d, pairs, sb);
      scores32<dout>(s.qb.data(), kblk + 32 * d, kblk + 48 * d, pairs, sb + 32);
      const uint64_t block_bits = s.bits[b];
      const bool diagonal = h.causal && key0 + kKeys - 1 > first_limit;  // a row of the block misses some key
      if (diagonal)
        softmax_block(sb, s.pb.data(), mx, lv, alpha, c,
                      [&](int64_t r) { return block_bits & keys_up_to(first_limit + r - key0); });
      else
        softmax_block(sb, s.pb.data(), mx, lv, alpha, c, [&](int64_t) { return block_bits; });
      const uint16_t* vblk = s.vp.data() + (key0 / 2) * T * 32;
      for (int64_t r = 0; r < kRows; r += R)
        accumulate_rows<T, R>(s.pb.data() + r * kKeys, vblk, ob + r * dout, alpha + r);
    }
    write_rows(h, q0, nq, ob, lv, dout);
  }
}

IK_FLASH_FN inline void run_head(const Head& h, Scratch& s) {
  switch ((h.d + 15) / 16) {  // output chunks T
    case 1: run_head_t<1>(h, s); break;
    case 2: run_head_t<2>(h, s); break;
    case 3: run_head_t<3>(h, s); break;
    case 4: run_head_t<4>(h, s); break;
    case 5: run_head_t<5>(h, s); break;
    case 6: run_head_t<6>(h, s); break;
    case 7: run_head_t<7>(h, s); break;
    default: run_head_t<8>(h, s); break;
  }
}

}  // namespace vavx
}  // namespace attn
}  // namespace idefics3_kit

IK_INTRINSICS_END
#endif
