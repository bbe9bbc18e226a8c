// Torch-free tests of the quantized few-row kernel (csrc/include/idefics3_kit/gemv_quant.h): each
// path the CPU can run (the portable loop, AVX2 + FMA, AVX-512 VNNI), int8 and int4 (groups 32/64/128,
// K ending inside a 128-column step), 1..8 rows, against a double-precision loop over the
// quantized activations and the dequantized weights; the activation quantization against its
// definition. Buffers are sized exactly, so ASan sees any read past a row or a table.
#include <idefics3_kit/gemv_quant.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"

namespace q = idefics3_kit::qgemv;
using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

namespace {

// A kernel path: the arguments run_rows / run_dequant take to pick it.
struct Path {
  const char* name;
  bool vector, avx512;
};

// The paths this CPU runs: always the portable loop, then AVX2 and AVX-512 where present.
std::vector<Path> paths() {
  std::vector<Path> out{{"portable", false, false}};
  if (q::avx2_path()) out.push_back({"avx2", true, false});
  if (q::avx512_path()) out.push_back({"avx512", true, true});
  static bool told = false;
  if (!told) {
    std::printf("gemv_quant paths on this CPU:");
    for (const Path& p : out) std::printf(" %s", p.name);
    std::printf("\n");
    told = true;
  }
  return out;
}

struct Problem {
  int64_t rows, k, n, bits, group;
  std::vector<uint16_t> x;       // [rows, k] bf16
  std::vector<uint8_t> w;        // int8 [n, k] or packed [n, k/2]
  std::vector<uint16_t> scales;  // bf16 [n] or [n, k/group]
  std::vector<float> bias;       // [n] or empty
};

Problem make(std::mt19937& rng, int64_t rows, int64_t k, int64_t n, int bits, int64_t group, bool bias) {
  Problem p{rows, k, n, bits, group, {}, {}, {}, {}};
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255), i8(-127, 127);
  p.x.resize(rows * k);
  for (auto& v : p.x) v = float_to_bf16_rne(normal(rng));
  if (bits == 8) {
    p.w.resize(n * k);
    for (auto& v : p.w) v = static_cast<uint8_t>(static_cast<int8_t>(i8(rng)));
    p.scales.resize(n);
  } else {
    p.w.resize(n * k / 2);
    for (auto& v : p.w) v = static_cast<uint8_t>(byte(rng));
    p.scales.resize(n * (k / group));
  }
  for (auto& s : p.scales) s = float_to_bf16_rne(normal(rng) * 0.01f);
  if (bias) {
    p.bias.resize(n);
    for (auto& b : p.bias) b = normal(rng);
  }
  return p;
}

double weight(const Problem& p, int64_t r, int64_t i) {
  if (p.bits == 8) return static_cast<int8_t>(p.w[r * p.k + i]) * static_cast<double>(bf16_bits_to_float(p.scales[r]));
  const uint8_t b = p.w[r * (p.k / 2) + i / 2];
  const int v = ((i & 1) ? (b >> 4) : (b & 0xF)) - 8;
  return v * static_cast<double>(bf16_bits_to_float(p.scales[r * (p.k / p.group) + i / p.group]));
}

// The prepared activations for p.x (sizes from act_sizes: exact, for ASan).
struct Prepared {
  std::vector<int8_t> xq, xeo;
  std::vector<int32_t> init8, init4;
  std::vector<float> xs, xs8, xs4;
  q::Act act;
  explicit Prepared(const Problem& p, bool vector = true, bool avx512 = true) {
    const q::ActSizes n = q::act_sizes(p.rows, p.k);
    xq.resize(n.xq), xeo.resize(n.xeo), init8.resize(n.init8), init4.resize(n.init4), xs.resize(n.xs);
    xs8.resize(n.xs8), xs4.resize(n.xs4);
    q::prepare(p.x.data(), p.rows, p.k, p.k, xq.data(), xs.data(), xeo.data(), init8.data(), init4.data(), xs8.data(),
               xs4.data(), vector, avx512);
    act = q::Act{p.rows, p.k, q::padded_k(p.k), xq.data(), xs.data(), xeo.data(), init8.data(), init4.data(),
                 xs8.data(), xs4.data()};
  }
};

// x[m, i] as the kernel sees it: its int8 value times its block's scale.
double x_seen(const Prepared& a, int64_t m, int64_t i) {
  return a.xq[m * a.act.kpad + i] * static_cast<double>(a.xs[m * (a.act.kpad / 32) + i / 32]);
}

// Runs the kernel over rows [0, n) in two pieces (as two workers would) and checks every output
// against the exact sum: within one bf16 ulp plus the fp32 accumulation bound.
void check(const Problem& p, const Path& path) {
  const int64_t y_stride = p.n + 3;
  std::vector<uint16_t> y(p.rows * y_stride, 0xDEAD);
  const Prepared a(p, path.avx512);
  const q::Job job{p.w.data(), static_cast<int>(p.bits), p.group, p.scales.data(),
                   p.bias.empty() ? nullptr : p.bias.data(), y.data() + 1, y_stride};
  const int64_t cut = p.n / 2 / 4 * 4 + 1;  // an odd cut: the single-row tail of the first piece
  q::run_rows(a.act, job, 0, cut, path.vector, path.avx512);
  q::run_rows(a.act, job, cut, p.n, path.vector, path.avx512);
  for (int64_t m = 0; m < p.rows; ++m)
    for (int64_t c = 0; c < y_stride; ++c) {
      const uint16_t got = y[m * y_stride + c];
      const int64_t r = c - 1;
      if (r < 0 || r >= p.n) {
        CHECK(got == 0xDEAD);
        continue;
      }
      double exact = p.bias.empty() ? 0.0 : p.bias[r], mag = std::fabs(exact);
      for (int64_t i = 0; i < p.k; ++i) {
        const double prod = x_seen(a, m, i) * weight(p, r, i);
        exact += prod;
        mag += std::fabs(prod);
      }
      const double err = std::fabs(static_cast<double>(bf16_bits_to_float(got)) - exact);
      const double bound = std::fabs(exact) * std::ldexp(1.0, -8) + mag * p.k * std::ldexp(1.0, -24) * 2 + 1e-30;
      if (!(err <= bound)) {
        std::fprintf(stderr, "bits %lld group %lld rows %lld k %lld %s: y[%lld, %lld] = %g, exact %g\n",
                     static_cast<long long>(p.bits), static_cast<long long>(p.group), static_cast<long long>(p.rows),
                     static_cast<long long>(p.k), path.name, static_cast<long long>(m), static_cast<long long>(r),
                     bf16_bits_to_float(got), exact);
      }
      CHECK(err <= bound);
    }
}

// Each block's int8 values are round-half-even(x * 127 / amax) with scale amax / 127: every value
// within half a step of x, the block's peak at +-127, zeros past k and for an all-zero block.
void test_activation_quantization() {
  std::mt19937 rng(11);
  for (int64_t k : {32, 40, 96, 576}) {
    Problem p = make(rng, 2, k, 1, 8, 0, false);
    for (int64_t i = 0; i < 32 && i < k; ++i) p.x[k + i] = 0;  // row 1 starts with an all-zero block
    const Prepared a(p);
    for (int64_t m = 0; m < 2; ++m)
      for (int64_t i = 0; i < a.act.kpad; ++i) {
        const float s = a.xs[m * (a.act.kpad / 32) + i / 32];
        if (i >= k) {
          CHECK(a.xq[m * a.act.kpad + i] == 0);
          continue;
        }
        const double x = bf16_bits_to_float(p.x[m * k + i]);
        CHECK(std::fabs(x_seen(a, m, i) - x) <= 0.5 * s + std::fabs(x) * std::ldexp(1.0, -20) + 1e-30);  // + rounding of x * inv
      }
    CHECK(a.xs[a.act.kpad / 32] == 0.0f);  // row 1's zero block
    int peak = 0;
    for (int64_t i = 0; i < std::min<int64_t>(32, k); ++i) peak = std::max(peak, std::abs(int{a.xq[i]}));
    CHECK(peak == 127);
  }
}

void test_against_double_both_paths() {
  std::mt19937 rng(7);
  for (const Path& path : paths()) {
    for (int64_t rows : {1, 2, 3, 4, 5, 8})
      for (int64_t k : {32, 40, 96, 128, 160, 576, 1536}) {
        check(make(rng, rows, k, 13, 8, 0, rows % 2 == 1), path);
        for (int64_t group : {32, 64, 128})
          if (k % group == 0) check(make(rng, rows, k, 11, 4, group, rows % 2 == 0), path);
      }
  }
}

// Every vectorized prepare writes the portable one's bytes (so a kernel path never changes the
// quantized activations), including k inside a block, an all-zero block and an inf; the AVX2 one
// also with NaNs (skipped like std::max skips them; the AVX-512 one is not held to that).
bool same_bytes(const Prepared& a, const Prepared& b) {
  auto eq = [](const std::vector<float>& x, const std::vector<float>& y) {  // NaN scales compare by bits
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  return a.xq == b.xq && eq(a.xs, b.xs) && a.xeo == b.xeo && a.init8 == b.init8 && a.init4 == b.init4 &&
         eq(a.xs8, b.xs8) && eq(a.xs4, b.xs4);
}

void test_prepare_paths_agree() {
  std::mt19937 rng(5);
  const uint16_t inf = 0x7F80, nan = 0x7FC0;
  for (const Path& path : paths()) {
    if (!path.vector) continue;
    for (int64_t k : {32, 40, 96, 160, 576, 1536})
      for (int64_t rows : {1, 3})
        for (int special = 0; special < 3; ++special) {  // none, inf, NaN
          if (special == 2 && path.avx512) continue;
          Problem p = make(rng, rows, k, 1, 8, 0, false);
          for (int64_t i = 0; i < std::min<int64_t>(32, k); ++i) p.x[i] = 0;
          if (special > 0) {
            const uint16_t bad = special == 1 ? inf : nan;
            p.x[k - 1] = bad;                                // the last block
            p.x[(rows - 1) * k + k / 2] = bad | 0x8000;     // the last row, negative
          }
          const Prepared a(p, false), b(p, true, path.avx512);
          CHECK(same_bytes(a, b));
        }
  }
}

// Every nibble value decodes to its weight in both paths (x = 1.0 on one column: xq 127, scale 1/127).
void test_every_nibble() {
  for (const Path& path : paths()) {
    Problem p{1, 128, 16, 4, 64, {}, {}, {}, {}};
    p.x.assign(128, 0);
    p.x[5] = float_to_bf16_rne(1.0f);  // column 5: the high nibble of byte 2
    p.w.assign(16 * 64, 0x88);
    for (int r = 0; r < 16; ++r) p.w[r * 64 + 2] = static_cast<uint8_t>(0x08 | (r << 4));
    p.scales.assign(16 * 2, float_to_bf16_rne(1.0f));
    std::vector<uint16_t> y(16);
    const Prepared a(p);
    const q::Job job{p.w.data(), 4, 64, p.scales.data(), nullptr, y.data(), 16};
    q::run_rows(a.act, job, 0, 16, path.vector, path.avx512);
    for (int r = 0; r < 16; ++r) CHECK(bf16_bits_to_float(y[r]) == float_to_bf16_rne((r - 8) * 127 * (1.0f / 127)) ||
                                       std::fabs(bf16_bits_to_float(y[r]) - (r - 8)) <= 1e-2);
  }
}

// The int4 kernel sums its int32 lanes through int16 (packs + pair sums, exact while |lane| <=
// 8 x 8 x 127): weights and activations at the ends of their ranges, where a block sums to
// +-32512, must still give the exact value in both paths (every x = +-1, so xq = +-127, and every
// nibble 0, weight -8, or 15, weight 7).
void test_int4_range_ends() {
  for (const Path& path : paths()) {
    for (int64_t k : {512, 1536}) {
      for (int sign : {1, -1}) {
        Problem p{1, k, 4, 4, 32, {}, {}, {}, {}};
        p.x.assign(k, float_to_bf16_rne(static_cast<float>(sign)));
        p.w.assign(4 * k / 2, 0x00);                                    // rows 0, 1: every weight -8
        std::fill(p.w.begin() + k, p.w.end(), uint8_t{0xFF});           // rows 2, 3: every weight 7
        p.scales.assign(4 * (k / 32), float_to_bf16_rne(1.0f / 64));  // exact in bf16
        std::vector<uint16_t> y(4);
        const Prepared a(p);
        const q::Job job{p.w.data(), 4, 32, p.scales.data(), nullptr, y.data(), 4};
        q::run_rows(a.act, job, 0, 4, path.vector, path.avx512);
        for (int r = 0; r < 4; ++r) {
          const double exact = (r < 2 ? -8.0 : 7.0) * sign * static_cast<double>(k) / 64;
          CHECK(std::fabs(bf16_bits_to_float(y[r]) - exact) <= std::fabs(exact) * std::ldexp(1.0, -8));
        }
      }
    }
  }
}

// Every path's dequantize equals the portable one (and q * s rounded once), every format.
void test_dequantize_paths_agree() {
  std::mt19937 rng(3);
  for (int64_t k : {32, 40, 96, 576}) {
    for (int64_t group : {0, 32, 64}) {
      if (group && k % group) continue;
      const Problem p = make(rng, 1, k, 7, group ? 4 : 8, group, false);
      const q::Job job{p.w.data(), static_cast<int>(p.bits), p.group, p.scales.data(), nullptr, nullptr, 0};
      std::vector<uint16_t> a(p.n * k), b(p.n * k);
      q::run_dequant(job, k, a.data(), 0, p.n, false);
      for (const Path& path : paths()) {
        std::fill(b.begin(), b.end(), 0);
        q::run_dequant(job, k, b.data(), 0, p.n, path.vector, path.avx512);
        CHECK(a == b);
      }
      for (int64_t r = 0; r < p.n; ++r)
        for (int64_t i = 0; i < k; ++i) CHECK(a[r * k + i] == float_to_bf16_rne(static_cast<float>(weight(p, r, i))));
    }
  }
}

}  // namespace

TEST_MAIN(test_against_double_both_paths(); test_activation_quantization(); test_prepare_paths_agree(); test_every_nibble(); test_int4_range_ends();
          test_dequantize_paths_agree();)
