// Torch-free tests of the quantized few-row kernel (csrc/include/idefics3_kit/gemv_quant.h): the
// AVX-512 path where the CPU has it and the portable loop, int8 and int4 (groups 32/64/128, K
// with a half 64-column chunk at the end), 1..8 rows, against a double-precision loop over the
// dequantized weights. Buffers are sized exactly, so ASan sees any read past a row or a table.
#include <idefics3_kit/gemv_quant.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"

namespace q = idefics3_kit::qgemv;
using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

namespace {

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

// Runs the kernel over rows [0, n) in two pieces (as two workers would) and checks every output
// against the exact sum: within one bf16 ulp plus the fp32 accumulation bound.
void check(const Problem& p, bool vector) {
  const int64_t y_stride = p.n + 3;
  std::vector<uint16_t> y(p.rows * y_stride, 0xDEAD);
  std::vector<float> xf(p.rows * p.k);
  std::vector<uint16_t> xeo(p.rows * q::padded_k(p.k));
  std::vector<float> xinit(p.rows * q::padded_k(p.k) / 4);
  q::prepare(p.x.data(), p.rows, p.k, p.k, xf.data(), xeo.data(), xinit.data());
  const q::Act act{p.rows, p.k, q::padded_k(p.k), xf.data(), xeo.data(), xinit.data()};
  const q::Job job{p.w.data(), static_cast<int>(p.bits), p.group, p.scales.data(),
                   p.bias.empty() ? nullptr : p.bias.data(), y.data() + 1, y_stride};
  const int64_t cut = p.n / 2 / 4 * 4 + 1;  // an odd cut: the single-row tail of the first piece
  q::run_rows(act, job, 0, cut, vector);
  q::run_rows(act, job, cut, p.n, vector);
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
        const double prod = bf16_bits_to_float(p.x[m * p.k + i]) * weight(p, r, i);
        exact += prod;
        mag += std::fabs(prod);
      }
      const double err = std::fabs(static_cast<double>(bf16_bits_to_float(got)) - exact);
      const double bound = std::fabs(exact) * std::ldexp(1.0, -8) + mag * p.k * std::ldexp(1.0, -24) * 2 + 1e-30;
      if (!(err <= bound)) {
        std::fprintf(stderr, "bits %lld group %lld rows %lld k %lld vector %d: y[%lld, %lld] = %g, exact %g\n",
                     static_cast<long long>(p.bits), static_cast<long long>(p.group), static_cast<long long>(p.rows),
                     static_cast<long long>(p.k), vector, static_cast<long long>(m), static_cast<long long>(r),
                     bf16_bits_to_float(got), exact);
      }
      CHECK(err <= bound);
    }
}

void test_against_double_both_paths() {
  std::mt19937 rng(7);
  for (bool vector : {false, true}) {
    if (vector && !q::vectorized()) {
      std::printf("AVX-512 BF16 not available: portable path only\n");
      continue;
    }
    for (int64_t rows : {1, 2, 3, 4, 5, 8})
      for (int64_t k : {32, 40, 96, 128, 576}) {
        check(make(rng, rows, k, 13, 8, 0, rows % 2 == 1), vector);
        for (int64_t group : {32, 64, 128})
          if (k % group == 0) check(make(rng, rows, k, 11, 4, group, rows % 2 == 0), vector);
      }
  }
}

// Every nibble value decodes to its weight (the vpermw table) in both paths.
void test_every_nibble() {
  for (bool vector : {false, true}) {
    if (vector && !q::vectorized()) continue;
    Problem p{1, 64, 16, 4, 64, {}, {}, {}, {}};
    p.x.assign(64, 0);
    p.x[5] = float_to_bf16_rne(1.0f);  // column 5: the high nibble of byte 2
    p.w.assign(16 * 32, 0x88);
    for (int r = 0; r < 16; ++r) p.w[r * 32 + 2] = static_cast<uint8_t>(0x08 | (r << 4));
    p.scales.assign(16, float_to_bf16_rne(1.0f));
    std::vector<float> xf(64);
    std::vector<uint16_t> xeo(64), y(16);
    std::vector<float> xinit(16);
    q::prepare(p.x.data(), 1, 64, 64, xf.data(), xeo.data(), xinit.data());
    const q::Act act{1, 64, 64, xf.data(), xeo.data(), xinit.data()};
    const q::Job job{p.w.data(), 4, 64, p.scales.data(), nullptr, y.data(), 16};
    q::run_rows(act, job, 0, 16, vector);
    for (int r = 0; r < 16; ++r) CHECK(bf16_bits_to_float(y[r]) == static_cast<float>(r - 8));
  }
}

// The vectorized dequantize equals the portable one (and q * s rounded once), every format.
void test_dequantize_paths_agree() {
  std::mt19937 rng(3);
  for (int64_t k : {32, 40, 96, 576}) {
    for (int64_t group : {0, 32, 64}) {
      if (group && k % group) continue;
      const Problem p = make(rng, 1, k, 7, group ? 4 : 8, group, false);
      const q::Job job{p.w.data(), static_cast<int>(p.bits), p.group, p.scales.data(), nullptr, nullptr, 0};
      std::vector<uint16_t> a(p.n * k), b(p.n * k);
      q::run_dequant(job, k, a.data(), 0, p.n, false);
      q::run_dequant(job, k, b.data(), 0, p.n, true);
      CHECK(a == b);
      for (int64_t r = 0; r < p.n; ++r)
        for (int64_t i = 0; i < k; ++i) CHECK(a[r * k + i] == float_to_bf16_rne(static_cast<float>(weight(p, r, i))));
    }
  }
}

}  // namespace

TEST_MAIN(test_against_double_both_paths(); test_every_nibble(); test_dequantize_paths_agree();)
