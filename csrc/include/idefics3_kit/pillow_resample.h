// Pillow-exact LANCZOS resampling of uint8 images, torch-free.
//
// Re-implements the algorithm Pillow documents for Image.resize(..., LANCZOS) on 8-bit
// images: separable filter, coefficients computed in double, normalized to sum 1, quantized
// to int32 with 22 fractional bits (round half away from zero); each output value is
// (1 << 21) + sum(pixel * coeff) in int32, shifted right by 22 and clipped to [0, 255].
// The horizontal pass runs first into a uint8 intermediate that covers only the input rows
// the vertical pass reads, except that (as Pillow 13) the vertical pass runs first when the
// height shrinks by more than twice as many pixels as the width; a pass whose axis keeps its
// size is skipped; same size = copy.
// Integer math in the same tap order makes the result bit-identical to Pillow.
//
// The coefficient code is plain C++ so the CUDA kernels can reuse it on the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

// Hot loops get one clone per ISA level, picked at load time (users' CPUs differ, so no
// -march=native at build time).
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && defined(__x86_64__) && \
    __GNUC__ >= 11 && !defined(IDEFICS3_KIT_NO_CLONES)
#define IK_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define IK_MULTIVERSION
#endif

namespace idefics3_kit {
namespace pillow {

constexpr int kPrecisionBits = 32 - 8 - 2;  // 22, as Pillow's 8-bit path
constexpr double kPi = 3.14159265358979323846;
constexpr double kLanczosSupport = 3.0;

inline double sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * kPi;
  return std::sin(x) / x;
}

// 3-lobe windowed sinc, zero outside [-3, 3).
inline double lanczos(double x) {
  if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3.0);
  return 0.0;
}

// Resampling weights of one axis: output i reads count[i] inputs from first[i] on, with
// fixed-point weights k[i * ksize + t].
//
// The same weights split for 16-bit multiplies: k = hi * 2^11 + lo with 0 <= lo < 2^11, and
// taps 2p and 2p + 1 packed as two int16 in one int32 (low half = tap 2p; a missing odd tap
// has weight 0): pair_hi[i * kpairs + p], pair_lo[...]. sum(pixel * k) is then
// 2^11 * sum(pixel * hi) + sum(pixel * lo), computed exactly with pairwise 16-bit multiply-adds
// (vpdpwssd, see pair_block), which run twice as fast as the 32-bit multiplies of the plain loop.
constexpr int kSplitBits = 11;

struct AxisCoeffs {
  int in_size = 0;
  int out_size = 0;
  int ksize = 0;
  int kpairs = 0;
  bool pairs_ok = false;  // pair_hi / pair_lo hold the weights exactly (checked in split_coeffs)
  std::vector<int> first;
  std::vector<int> count;
  std::vector<int32_t> k;
  std::vector<int32_t> pair_hi;
  std::vector<int32_t> pair_lo;
};

inline int32_t pack_int16_pair(int32_t low, int32_t high) {
  return static_cast<int32_t>((static_cast<uint32_t>(low) & 0xFFFFu) | (static_cast<uint32_t>(high) << 16));
}

// Fill pair_hi / pair_lo from k (see AxisCoeffs).
inline void split_coeffs(AxisCoeffs& c) {
  c.kpairs = (c.ksize + 1) / 2;
  c.pair_hi.assign(static_cast<size_t>(c.out_size) * c.kpairs, 0);
  c.pair_lo.assign(static_cast<size_t>(c.out_size) * c.kpairs, 0);
  for (int x = 0; x < c.out_size; ++x) {
    const int32_t* k = &c.k[static_cast<size_t>(x) * c.ksize];
    for (int p = 0; p < c.kpairs; ++p) {
      const int32_t k0 = k[2 * p], k1 = 2 * p + 1 < c.ksize ? k[2 * p + 1] : 0;
      const size_t at = static_cast<size_t>(x) * c.kpairs + p;
      c.pair_hi[at] = pack_int16_pair(k0 >> kSplitBits, k1 >> kSplitBits);
      c.pair_lo[at] = pack_int16_pair(k0 & ((1 << kSplitBits) - 1), k1 & ((1 << kSplitBits) - 1));
    }
  }
  // The split weights are exact only if every hi part fits in int16: always so for LANCZOS
  // weights (magnitudes near 1, |hi| <= ~2^11); checked so the fast path can never be wrong.
  c.pairs_ok = c.kpairs > 0;
  for (int32_t k : c.k) c.pairs_ok = c.pairs_ok && (k >> kSplitBits) >= -32768 && (k >> kSplitBits) <= 32767;
}

// Quantize one normalized weight (round half away from zero, as Pillow).
inline int32_t to_fixed(double w) {
  const double s = static_cast<double>(1 << kPrecisionBits);
  return w < 0 ? static_cast<int32_t>(-0.5 + w * s) : static_cast<int32_t>(0.5 + w * s);
}

// LANCZOS weights for resizing in_size -> out_size over the full box [0, in_size).
inline AxisCoeffs lanczos_coeffs(int in_size, int out_size) {
  AxisCoeffs c;
  c.in_size = in_size;
  c.out_size = out_size;
  // Pillow takes the box as floats: (float)in_size - 0.0f, then widens to double.
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;  // antialias only when shrinking
  const double support = kLanczosSupport * filterscale;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.assign(out_size, 0);
  c.count.assign(out_size, 0);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = 0.0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation, as Pillow
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = lanczos((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double nw = ww != 0.0 ? w[x] / ww : w[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] = to_fixed(nw);
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  split_coeffs(c);
  return c;
}

inline uint8_t clip8(int32_t ss) {
  const int32_t v = ss >> kPrecisionBits;  // arithmetic shift, as Pillow's clip table index
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

#if defined(__GNUC__)
#define IK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define IK_ALWAYS_INLINE inline
#endif

// GCC 12's AVX-512 intrinsics start many results from an undefined vector (_mm512_undefined_ps
// and friends: _mm512_reduce_add_ps, masked loads, 512 -> 256-bit casts, shuffles) that no lane of
// the result reads, and -W(maybe-)uninitialized reports every place they are inlined: hundreds of
// false positives that hid real warnings in the build log. The kernel headers wrap their code in
// IK_INTRINSICS_BEGIN / IK_INTRINSICS_END.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define IK_INTRINSICS_BEGIN                                   \
  _Pragma("GCC diagnostic push")                              \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define IK_INTRINSICS_END _Pragma("GCC diagnostic pop")
#else
#define IK_INTRINSICS_BEGIN
#define IK_INTRINSICS_END
#endif

IK_INTRINSICS_BEGIN

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(IDEFICS3_KIT_NO_AVX512)
#define IK_RESAMPLE_AVX512 1
}  // namespace pillow
}  // namespace idefics3_kit
#include <immintrin.h>
namespace idefics3_kit {
namespace pillow {
// A full block of 16 RGB rows moves one pixel column per instruction: a 16-lane gather
// (each lane 4 bytes of one row) in, a 16-lane scatter out. The last pixel of a row is left
// to the caller (its 4th byte would fall outside the row).
__attribute__((target("avx512f"))) inline void gather_rgb_block(const uint8_t* src, ptrdiff_t stride, int in_w,
                                                                 uint8_t* t_in) {
  const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(stride)));
  for (int x = 0; x + 1 < in_w; ++x)
    _mm512_storeu_si512(t_in + static_cast<size_t>(x) * 64, _mm512_i32gather_epi32(offs, src + x * 3, 1));
}
__attribute__((target("avx512f"))) inline void scatter_rgb_block(const uint8_t* t_out, int out_w, uint8_t* dst,
                                                                  ptrdiff_t stride) {
  const __m512i offs = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(stride)));
  for (int x = 0; x + 1 < out_w; ++x)  // x ascending: pixel x + 1 rewrites the byte x spilled into
    _mm512_i32scatter_epi32(dst + x * 3, offs, _mm512_loadu_si512(t_out + static_cast<size_t>(x) * 64), 1);
}
inline bool resample_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}
// The pair kernel's instructions: Ice Lake, Sapphire Rapids and Zen 4 on.
inline bool resample_avx512_pairs() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
}

// vpermt2b indices of pair_block: int32 d of group q takes byte 16q + d of row 2p (byte 0) and
// of row 2p + 1 (byte 2; index 64 + ... selects the second register).
struct PairIndex {
  alignas(64) uint8_t bytes[4][64];
};
constexpr PairIndex make_pair_index() {
  PairIndex t{};
  for (int q = 0; q < 4; ++q)
    for (int d = 0; d < 16; ++d) {
      t.bytes[q][4 * d] = static_cast<uint8_t>(16 * q + d);
      t.bytes[q][4 * d + 2] = static_cast<uint8_t>(64 + 16 * q + d);
    }
  return t;
}
inline constexpr PairIndex kPairIndex = make_pair_index();

// 64 lanes of weighted_rows through the split weights (AxisCoeffs). Per pair of taps, one
// byte permute (vpermt2b, zeroing the odd bytes) turns 16 pixels of row 2p and 16 of row 2p + 1
// into 16 int32 holding the int16 pair (pixel of row 2p, pixel of row 2p + 1), and vpdpwssd
// multiplies each pair by the packed hi (or lo) weights and adds both products to the
// accumulator: 4 permutes and 8 multiply-adds per 128 multiply-accumulates, twice the rate of
// the 32-bit multiplies of the plain loop. Lanes at or past n are neither read nor written.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni"))) IK_ALWAYS_INLINE void pair_block(
    const uint8_t* src, ptrdiff_t step, int taps, const int32_t* khi, const int32_t* klo, uint8_t* out, int n) {
  const __mmask64 valid = n >= 64 ? ~__mmask64{0} : ((__mmask64{1} << n) - 1);
  constexpr __mmask64 kPairBytes = 0x5555555555555555ull;  // bytes 0 and 2 of every int32
  __m512i index[4], hi[4], lo[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    index[q] = _mm512_load_si512(kPairIndex.bytes[q]);
    hi[q] = lo[q] = _mm512_setzero_si512();
  }
  for (int p = 0; 2 * p < taps; ++p) {
    const uint8_t* a = src + 2 * p * step;
    const uint8_t* b = 2 * p + 1 < taps ? a + step : a;  // odd count: the pad tap has weight 0
    const __m512i ra = _mm512_maskz_loadu_epi8(valid, a), rb = _mm512_maskz_loadu_epi8(valid, b);
    const __m512i ch = _mm512_set1_epi32(khi[p]), cl = _mm512_set1_epi32(klo[p]);
  #pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
      const __m512i pairs = _mm512_maskz_permutex2var_epi8(kPairBytes, ra, index[q], rb);
      hi[q] = _mm512_dpwssd_epi32(hi[q], pairs, ch);
      lo[q] = _mm512_dpwssd_epi32(lo[q], pairs, cl);
    }
  }
  const __m512i half = _mm512_set1_epi32(1 << (kPrecisionBits - 1)), zero = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(hi[q], kSplitBits), lo[q]), half);
    const __m512i v = _mm512_max_epi32(_mm512_srai_epi32(sum, kPrecisionBits), zero);  // clip below at 0
    const __mmask16 lanes = static_cast<__mmask16>(valid >> (16 * q));
    _mm_mask_storeu_epi8(out + 16 * q, lanes, _mm512_cvtusepi32_epi8(v));  // clip above at 255
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni"))) inline void weighted_rows_pairs(
    const uint8_t* src, ptrdiff_t step, int taps, const int32_t* khi, const int32_t* klo, uint8_t* out, int n) {
  for (int i = 0; i < n; i += 64) pair_block(src + i, step, taps, khi, klo, out + i, n - i);
}
#endif

// N lanes of the weighted sum below; N is a compile-time constant so the accumulators stay
// in vector registers across all taps.
template <int N>
IK_ALWAYS_INLINE void weighted_lanes(const uint8_t* src, ptrdiff_t step, int taps, const int32_t* k, uint8_t* out) {
  int32_t acc[N];
  for (int i = 0; i < N; ++i) acc[i] = 1 << (kPrecisionBits - 1);
  for (int t = 0; t < taps; ++t) {
    const uint8_t* s = src + t * step;
    const int32_t kt = k[t];
    for (int i = 0; i < N; ++i) acc[i] += static_cast<int32_t>(s[i]) * kt;
  }
  for (int i = 0; i < N; ++i) out[i] = clip8(acc[i]);
}

// out[i] = clip8(2^21 + sum_t src[t * step + i] * k[t]) for i < n: the one inner loop of both
// passes (the horizontal pass transposes blocks of rows so that it has this shape too).
IK_MULTIVERSION static void weighted_rows_plain(const uint8_t* src, ptrdiff_t step, int taps, const int32_t* k,
                                                uint8_t* out, int n) {
  int i = 0;
  for (; i + 64 <= n; i += 64) weighted_lanes<64>(src + i, step, taps, k, out + i);
  for (; i + 16 <= n; i += 16) weighted_lanes<16>(src + i, step, taps, k, out + i);
  for (; i < n; ++i) weighted_lanes<1>(src + i, step, taps, k, out + i);
}

// weighted_rows for output x of axis c: the 16-bit pair kernel where the CPU has it,
// else the plain loop. Both are exact integer sums, so the result is the same bit for bit.
inline void weighted_rows(const AxisCoeffs& c, int x, const uint8_t* src, ptrdiff_t step, uint8_t* out, int n) {
#ifdef IK_RESAMPLE_AVX512
  if (c.pairs_ok && resample_avx512_pairs())
    return weighted_rows_pairs(src, step, c.count[x], &c.pair_hi[static_cast<size_t>(x) * c.kpairs],
                               &c.pair_lo[static_cast<size_t>(x) * c.kpairs], out, n);
#endif
  weighted_rows_plain(src, step, c.count[x], &c.k[static_cast<size_t>(x) * c.ksize], out, n);
}

// Vertical pass for output rows [y0, y1): src holds input rows starting at row src_row0,
// each row_len = width * channels bytes, src_stride apart.
inline void vertical_rows(const AxisCoeffs& cy, const uint8_t* src, ptrdiff_t src_stride, int src_row0, int row_len,
                          uint8_t* dst, ptrdiff_t dst_stride, int y0, int y1) {
  for (int y = y0; y < y1; ++y) {
    const uint8_t* first = src + static_cast<ptrdiff_t>(cy.first[y] - src_row0) * src_stride;
    weighted_rows(cy, y, first, src_stride, dst + y * dst_stride, row_len);
  }
}

// Rows per transposed block of the horizontal pass.
constexpr int kHBlock = 16;


// Horizontal pass for input rows [r0, r1) (r1 - r0 <= kHBlock) into dst rows [r0 - dst_row0, ...).
// The rows are transposed to [x][row][pixel] so that every output column is a weighted sum of
// whole transposed input columns (the vertical kernel's shape). RGB pixels take 4 bytes there
// (the 4th is junk, never written back) so one pixel moves as one 32-bit copy and 16 rows fill
// exactly 64 lanes.
inline void horizontal_block(const AxisCoeffs& cx, int channels, const uint8_t* src, ptrdiff_t src_stride, int r0,
                             int r1, uint8_t* dst, ptrdiff_t dst_stride, int dst_row0, std::vector<uint8_t>& scratch) {
  const int px = channels == 3 ? 4 : channels;  // bytes per pixel in the transposed block
  const int rows = r1 - r0, lanes = kHBlock * px, in_w = cx.in_size, out_w = cx.out_size;
  scratch.resize(static_cast<size_t>(in_w + out_w) * lanes);
  uint8_t* t_in = scratch.data();                                       // [in_w][kHBlock * px]
  uint8_t* t_out = scratch.data() + static_cast<size_t>(in_w) * lanes;  // [out_w][kHBlock * px]
  bool fast = false;  // whole 16-row RGB block with gathers / scatters
#ifdef IK_RESAMPLE_AVX512
  fast = channels == 3 && rows == kHBlock && resample_avx512();
  if (fast) gather_rgb_block(src + static_cast<ptrdiff_t>(r0) * src_stride, src_stride, in_w, t_in);
#endif
  for (int r = 0; r < rows; ++r) {
    const uint8_t* s = src + static_cast<ptrdiff_t>(r0 + r) * src_stride;
    uint8_t* d = t_in + r * px;
    if (channels == 3) {
      if (!fast)
        for (int x = 0; x + 1 < in_w; ++x) std::memcpy(d + static_cast<size_t>(x) * lanes, s + x * 3, 4);
      std::memcpy(d + static_cast<size_t>(in_w - 1) * lanes, s + (in_w - 1) * 3, 3);  // stay inside the row
    } else {
      for (int x = 0; x < in_w; ++x)
        for (int c = 0; c < channels; ++c) d[static_cast<size_t>(x) * lanes + c] = s[x * channels + c];
    }
  }
  const int used = rows * px;  // lanes holding real rows
  for (int x = 0; x < out_w; ++x)
    weighted_rows(cx, x, t_in + static_cast<size_t>(cx.first[x]) * lanes, lanes, t_out + static_cast<size_t>(x) * lanes,
                  used == lanes ? lanes : used);
#ifdef IK_RESAMPLE_AVX512
  if (fast) scatter_rgb_block(t_out, out_w, dst + static_cast<ptrdiff_t>(r0 - dst_row0) * dst_stride, dst_stride);
#endif
  for (int r = 0; r < rows; ++r) {
    uint8_t* d = dst + static_cast<ptrdiff_t>(r0 + r - dst_row0) * dst_stride;
    const uint8_t* s = t_out + r * px;
    if (channels == 3) {
      if (!fast)
        for (int x = 0; x + 1 < out_w; ++x) std::memcpy(d + x * 3, s + static_cast<size_t>(x) * lanes, 4);
      std::memcpy(d + (out_w - 1) * 3, s + static_cast<size_t>(out_w - 1) * lanes, 3);
    } else {
      for (int x = 0; x < out_w; ++x)
        for (int c = 0; c < channels; ++c) d[x * channels + c] = s[static_cast<size_t>(x) * lanes + c];
    }
  }
}

// Pillow (13+) runs the vertical pass first when the height shrinks by more than twice as
// many pixels as the width (both passes needed); otherwise horizontal first. The order
// changes the uint8 intermediate, so it must be the same for bit-exactness.
inline bool vertical_first(int in_h, int in_w, int out_h, int out_w) {
  const int dh = in_h - out_h;
  return dh > 0 && dh > 2 * (in_w - out_w);
}

// Horizontal pass over input rows [row0, row1) of src into dst rows [0, row1 - row0).
template <typename ParallelFor>
void horizontal_pass(const AxisCoeffs& cx, int channels, const uint8_t* src, ptrdiff_t src_stride, int row0, int row1,
                     uint8_t* dst, ptrdiff_t dst_stride, ParallelFor&& parallel_for) {
  const int blocks = (row1 - row0 + kHBlock - 1) / kHBlock;
  parallel_for(0, blocks, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const int r0 = row0 + static_cast<int>(b) * kHBlock, r1 = std::min(row1, r0 + kHBlock);
      horizontal_block(cx, channels, src, src_stride, r0, r1, dst, dst_stride, row0, scratch);
    }
  });
}

// Vertical pass into all out rows of dst; src row i holds input row src_row0 + i.
template <typename ParallelFor>
void vertical_pass(const AxisCoeffs& cy, const uint8_t* src, int src_row0, int row_len, uint8_t* dst,
                   ParallelFor&& parallel_for) {
  parallel_for(0, cy.out_size, [&](int64_t y0, int64_t y1) {
    vertical_rows(cy, src, row_len, src_row0, row_len, dst, row_len, static_cast<int>(y0), static_cast<int>(y1));
  });
}

// Full resize of a contiguous [in_h, in_w, channels] image into [out_h, out_w, channels].
// parallel_for(begin, end, fn(b, e)) runs fn over sub-ranges (serially in tests, with
// at::parallel_for in the op).
template <typename ParallelFor>
void resize(const uint8_t* src, int in_h, int in_w, int channels, uint8_t* dst, int out_h, int out_w,
            ParallelFor&& parallel_for) {
  const ptrdiff_t in_stride = static_cast<ptrdiff_t>(in_w) * channels;
  const ptrdiff_t out_stride = static_cast<ptrdiff_t>(out_w) * channels;
  const bool need_h = in_w != out_w, need_v = in_h != out_h;
  if (!need_h && !need_v) {
    std::memcpy(dst, src, static_cast<size_t>(in_h) * in_stride);
    return;
  }
  AxisCoeffs cy, cx;
  if (need_v) cy = lanczos_coeffs(in_h, out_h);
  if (need_h) cx = lanczos_coeffs(in_w, out_w);
  if (!need_v) return horizontal_pass(cx, channels, src, in_stride, 0, in_h, dst, out_stride, parallel_for);
  if (!need_h) return vertical_pass(cy, src, 0, static_cast<int>(in_stride), dst, parallel_for);
  std::unique_ptr<uint8_t[]> tmp;  // uninitialized: every byte is written by the first pass
  if (vertical_first(in_h, in_w, out_h, out_w)) {  // [out_h, in_w] intermediate
    tmp.reset(new uint8_t[static_cast<size_t>(out_h) * in_stride]);
    vertical_pass(cy, src, 0, static_cast<int>(in_stride), tmp.get(), parallel_for);
    return horizontal_pass(cx, channels, tmp.get(), in_stride, 0, out_h, dst, out_stride, parallel_for);
  }
  // Horizontal first, over only the input rows some output row reads.
  const int row0 = cy.first[0], row1 = cy.first[out_h - 1] + cy.count[out_h - 1];
  tmp.reset(new uint8_t[static_cast<size_t>(row1 - row0) * out_stride]);
  horizontal_pass(cx, channels, src, in_stride, row0, row1, tmp.get(), out_stride, parallel_for);
  vertical_pass(cy, tmp.get(), row0, static_cast<int>(out_stride), dst, parallel_for);
}

}  // namespace pillow
}  // namespace idefics3_kit

IK_INTRINSICS_END
