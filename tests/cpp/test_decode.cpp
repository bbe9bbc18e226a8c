// Torch-free tests of the decode kernels: the few-row bf16 linear (csrc/include/idefics3_kit/
// gemv_bf16.h: the AVX-512 BF16 and AVX2 paths where the CPU has them, and the portable loop; gemv_amx.h: the
// tile path for 4-16 rows where the CPU has AMX), the RMSNorm row (rms_norm.h) against naive
// double-precision loops, and the rotary row (rope.h) against the scalar formula it vectorizes.
#include <idefics3_kit/gemv_amx.h>
#include <idefics3_kit/gemv_bf16.h>
#include <idefics3_kit/rms_norm.h>
#include <idefics3_kit/rope.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <utility>
#include <vector>

#include "check.h"

namespace gemv = idefics3_kit::gemv;
namespace norm = idefics3_kit::norm;

namespace {

using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

bool is_nan_bf16(uint16_t v) { return (v & 0x7F80u) == 0x7F80u && (v & 0x7Fu) != 0; }

// One bf16 ulp at |v| (8 significant bits); the subnormal spacing below the normal range.
double ulp_bf16(double v) {
  const double a = std::fabs(v);
  if (a < std::ldexp(1.0, -126)) return std::ldexp(1.0, -133);
  int e;
  std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.0, e - 8);
}

std::vector<uint16_t> random_bf16(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<uint16_t> out(n);
  for (auto& v : out) v = float_to_bf16_rne(dist(rng));
  return out;
}

// ---- float <-> bf16 -------------------------------------------------------------------------

void test_bf16_round_trip_every_value() {
  for (uint32_t v = 0; v < 0x10000u; ++v) {
    const uint16_t b = static_cast<uint16_t>(v);
    const uint16_t back = float_to_bf16_rne(bf16_bits_to_float(b));
    if (is_nan_bf16(b)) {
      CHECK(is_nan_bf16(back) && (back & 0x40u) && (back & 0x8000u) == (b & 0x8000u));  // quiet NaN, same sign
    } else {
      CHECK(back == b);
    }
  }
}

void test_float_to_bf16_rounding_and_nan() {
  // round to nearest, ties to even (as torch's float -> bfloat16 cast)
  CHECK(float_to_bf16_rne(1.0f) == 0x3F80u);
  CHECK(float_to_bf16_rne(float_of(0x3F808000u)) == 0x3F80u);  // tie, even below
  CHECK(float_to_bf16_rne(float_of(0x3F818000u)) == 0x3F82u);  // tie, even above
  CHECK(float_to_bf16_rne(float_of(0x3F808001u)) == 0x3F81u);  // just past the tie
  CHECK(float_to_bf16_rne(float_of(0x3F807FFFu)) == 0x3F80u);
  CHECK(float_to_bf16_rne(-0.0f) == 0x8000u);
  CHECK(float_to_bf16_rne(float_of(0x7F800000u)) == 0x7F80u);   // +inf stays inf
  CHECK(float_to_bf16_rne(float_of(0xFF800000u)) == 0xFF80u);   // -inf
  CHECK(float_to_bf16_rne(float_of(0x7F7FFFFFu)) == 0x7F80u);   // FLT_MAX rounds up to inf (as torch)
  CHECK(float_to_bf16_rne(float_of(0x7F7F7FFFu)) == 0x7F7Fu);   // largest that stays finite
  CHECK(float_to_bf16_rne(float_of(0x00000001u)) == 0x0000u);   // smallest subnormal rounds to 0
  // NaNs: never rounded into inf (or wrapped to zero), sign kept, quiet bit set
  for (uint32_t nan : {0x7F800001u, 0x7F80FFFFu, 0x7FBFFFFFu, 0x7FC00000u, 0x7FFFFFFFu, 0xFF800001u, 0xFFFFFFFFu}) {
    const uint16_t b = float_to_bf16_rne(float_of(nan));
    CHECK(is_nan_bf16(b));
    CHECK((b & 0x40u) != 0);
    CHECK((b & 0x8000u) == ((nan >> 16) & 0x8000u));
  }
  CHECK(float_to_bf16_rne(std::nanf("")) == 0x7FC0u);
}

// ---- gemv -----------------------------------------------------------------------------------

using RowsFn = void (*)(const gemv::Job&, int64_t, int64_t);

struct Problem {
  int64_t rows_x, k, n, x_stride, y_stride, y_offset;
  std::vector<uint16_t> x, w;  // x [rows_x, x_stride] (exact size), w [n, k]
  std::vector<float> bias;     // [n] or empty
};

Problem make_problem(std::mt19937& rng, int64_t rows_x, int64_t k, int64_t n, bool with_bias, int64_t x_pad) {
  Problem p;
  p.rows_x = rows_x;
  p.k = k;
  p.n = n;
  p.x_stride = k + x_pad;
  p.y_offset = 2;             // this weight's outputs start at column 2 of a wider output
  p.y_stride = n + 5;
  // exactly sized buffers: ASan sees a read past the last row
  p.x = random_bf16(rng, static_cast<size_t>((rows_x - 1) * p.x_stride + k), 1.0f);
  p.w = random_bf16(rng, static_cast<size_t>(n * k), 1.0f / std::sqrt(static_cast<float>(k)));
  if (with_bias) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    p.bias.resize(n);
    for (auto& b : p.bias) b = dist(rng);
  }
  return p;
}

constexpr uint16_t kSentinel = 0xDEADu;

// Runs fn over weight rows [r0, r1) in the pieces given by cuts (as the op splits rows over workers).
std::vector<uint16_t> run(const Problem& p, RowsFn fn, const std::vector<int64_t>& cuts) {
  std::vector<uint16_t> y(static_cast<size_t>(p.rows_x * p.y_stride), kSentinel);
  const gemv::Job job{p.x.data(), p.rows_x, p.k, p.x_stride, p.w.data(), p.bias.empty() ? nullptr : p.bias.data(),
                      y.data() + p.y_offset, p.y_stride};
  for (size_t i = 0; i + 1 < cuts.size(); ++i) fn(job, cuts[i], cuts[i + 1]);
  return y;
}

// y within one bf16 ulp (plus the float32 accumulation error bound) of the exact result, and
// nothing written outside the job's columns.
void check_against_double(const Problem& p, const std::vector<uint16_t>& y) {
  for (int64_t m = 0; m < p.rows_x; ++m)
    for (int64_t c = 0; c < p.y_stride; ++c) {
      const uint16_t got = y[m * p.y_stride + c];
      const int64_t r = c - p.y_offset;
      if (r < 0 || r >= p.n) {
        CHECK(got == kSentinel);
        continue;
      }
      double exact = 0.0, mag = 0.0;
      for (int64_t i = 0; i < p.k; ++i) {
        const double prod = static_cast<double>(bf16_bits_to_float(p.x[m * p.x_stride + i])) *
                            static_cast<double>(bf16_bits_to_float(p.w[r * p.k + i]));
        exact += prod;
        mag += std::fabs(prod);
      }
      if (!p.bias.empty()) {
        exact += p.bias[r];
        mag += std::fabs(p.bias[r]);
      }
      const double g = bf16_bits_to_float(got);
      const double bound = ulp_bf16(std::fmax(std::fabs(g), std::fabs(exact))) +
                           static_cast<double>(p.k + 2) * std::ldexp(1.0, -24) * mag;
      CHECK(std::isfinite(g));
      CHECK(std::fabs(g - exact) <= bound);
    }
}

// Two results of the same sums in another float32 order: at most one bf16 ulp apart (plus the
// accumulation error bound); bit-identical where the order cannot matter (k <= 2: exact products).
void check_paths_agree(const Problem& p, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  for (int64_t m = 0; m < p.rows_x; ++m)
    for (int64_t r = 0; r < p.n; ++r) {
      const size_t at = static_cast<size_t>(m * p.y_stride + p.y_offset + r);
      if (p.k <= 2) {
        CHECK(a[at] == b[at]);
        continue;
      }
      double mag = p.bias.empty() ? 0.0 : std::fabs(p.bias[r]);
      for (int64_t i = 0; i < p.k; ++i)
        mag += std::fabs(static_cast<double>(bf16_bits_to_float(p.x[m * p.x_stride + i])) *
                         bf16_bits_to_float(p.w[r * p.k + i]));
      const double va = bf16_bits_to_float(a[at]), vb = bf16_bits_to_float(b[at]);
      CHECK(std::fabs(va - vb) <= ulp_bf16(std::fmax(std::fabs(va), std::fabs(vb))) +
                                      2.0 * static_cast<double>(p.k + 2) * std::ldexp(1.0, -24) * mag);
    }
}

// The vector paths this CPU runs, best last (the one run_rows dispatches to).
std::vector<std::pair<const char*, RowsFn>> vector_paths() {
  std::vector<std::pair<const char*, RowsFn>> out;
#ifdef IK_HAVE_GEMV_BF16_AVX2
  if (gemv::avx2_path()) out.push_back({"AVX2", gemv::avx2::rows});
#endif
#ifdef IK_HAVE_GEMV_BF16_PATH
  if (gemv::avx512_path()) out.push_back({"AVX-512 BF16", gemv::avx512bf16::rows});
#endif
  return out;
}

void dispatched_rows(const gemv::Job& j, int64_t r0, int64_t r1) { gemv::run_rows(j, r0, r1); }

void test_gemv_against_double_and_between_paths() {
  std::mt19937 rng(1234);
  const auto paths = vector_paths();
  std::printf("gemv: paths tested: portable");
  for (const auto& path : paths) std::printf(", %s", path.first);
  std::printf("\n");
  for (int64_t k : {1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 576, 1000})
    for (int64_t rows_x = 1; rows_x <= 5; ++rows_x)
      for (int64_t n : {1, 3, 4, 5, 9, 17})
        for (bool with_bias : {false, true}) {
          const int64_t x_pad = (k + rows_x + n) % 3 == 0 ? 0 : 5;  // x rows further apart than k
          const Problem p = make_problem(rng, rows_x, k, n, with_bias, x_pad);
          const std::vector<int64_t> whole = {0, n};
          const std::vector<uint16_t> portable = run(p, gemv::rows_portable, whole);
          check_against_double(p, portable);
          // a split into pieces (not multiples of the 4-row blocks) writes the same bits
          const std::vector<int64_t> pieces = {0, n / 3, n / 3, n / 2 + 1 > n ? n : n / 2 + 1, n};
          CHECK(run(p, gemv::rows_portable, pieces) == portable);
          std::vector<uint16_t> best = portable;
          for (const auto& path : paths) {
            const std::vector<uint16_t> fast = run(p, path.second, whole);
            check_against_double(p, fast);
            check_paths_agree(p, fast, portable);
            CHECK(run(p, path.second, pieces) == fast);  // each output's sum ignores the split
            best = fast;
          }
          CHECK(run(p, dispatched_rows, whole) == best);
        }
}

// A NaN in row 1 of x, +inf in weight row 4's last column (the tail on the AVX-512 path), a NaN bias
// for output 2.
void poison(Problem& p) {
  p.x[1 * p.x_stride + p.k / 2] = 0x7FC0u;
  p.w[4 * p.k + (p.k - 1)] = 0x7F80u;
  p.bias[2] = std::nanf("");
}

// What poison() must give: NaN where a NaN or inf * 0 enters the sum, inf (with x's sign) where
// inf * x dominates the finite rest, finite values elsewhere.
void check_poisoned(const Problem& p, const std::vector<uint16_t>& y) {
  for (int64_t m = 0; m < p.rows_x; ++m)
    for (int64_t r = 0; r < p.n; ++r) {
      const uint16_t v = y[m * p.y_stride + p.y_offset + r];
      const float xk = bf16_bits_to_float(p.x[m * p.x_stride + (p.k - 1)]);
      const bool nan = m == 1 || r == 2 || (r == 4 && xk == 0.0f);
      if (nan) {
        CHECK(is_nan_bf16(v));
      } else if (r == 4) {
        CHECK((v & 0x7FFFu) == 0x7F80u);
        CHECK(((v & 0x8000u) != 0) == (xk < 0.0f));
      } else {
        CHECK(std::isfinite(bf16_bits_to_float(v)));
      }
    }
}

void test_gemv_propagates_nan_and_inf() {
  std::mt19937 rng(7);
  for (int64_t k : {1, 33, 576}) {
    Problem p = make_problem(rng, 3, k, 6, true, 0);
    poison(p);
    check_poisoned(p, run(p, gemv::rows_portable, {0, p.n}));
    for (const auto& path : vector_paths()) check_poisoned(p, run(p, path.second, {0, p.n}));
  }
}

#ifdef IK_HAVE_AMX_PATH
// The tile path (4-16 x rows, K a multiple of 32): against double sums, against the AVX-512 loop
// (the same sums in another order), and split into pieces as the op's workers split the rows: a
// piece need not hold whole 16-row tiles (its last rows make a shorter tile), and the bits are
// the same however the rows are cut.
void test_gemv_amx_against_double_and_the_loop() {
  if (!gemv::amx::usable(gemv::amx::kMinRows, 32)) {
    std::printf("gemv amx: not tested (the CPU lacks AMX-BF16, or the OS refused the tile state)\n");
    return;
  }
  std::printf("gemv amx: tile path tested\n");
  std::mt19937 rng(99);
  for (int64_t k : {32, 64, 576, 1536})
    for (int64_t rows_x : {4, 5, 8, 13, 16})
      for (int64_t n : {16, 17, 31, 32, 48, 100})
        for (bool with_bias : {false, true}) {
          const int64_t x_pad = (k + rows_x + n) % 2 == 0 ? 0 : 8;
          const Problem p = make_problem(rng, rows_x, k, n, with_bias, x_pad);
          const std::vector<uint16_t> tiles = run(p, gemv::amx::rows, {0, n});
          check_against_double(p, tiles);
          check_paths_agree(p, tiles, run(p, gemv::avx512bf16::rows, {0, n}));
          // pieces as the op cuts them (multiples of 4) and arbitrary ones, empty ones included
          CHECK(run(p, gemv::amx::rows, {0, n / 2 / 4 * 4, n}) == tiles);
          CHECK(run(p, gemv::amx::rows, {0, n / 3, n / 3, n / 3 + 1, n}) == tiles);
        }
}

void test_gemv_amx_propagates_nan_and_inf() {
  if (!gemv::amx::usable(gemv::amx::kMinRows, 32)) return;
  std::mt19937 rng(8);
  for (int64_t k : {32, 576}) {
    Problem p = make_problem(rng, 6, k, 33, true, 0);
    poison(p);
    check_poisoned(p, run(p, gemv::amx::rows, {0, p.n}));
  }
}
#else
void test_gemv_amx_against_double_and_the_loop() { std::printf("gemv amx: not compiled in\n"); }
void test_gemv_amx_propagates_nan_and_inf() {}
#endif

// ---- rms_norm -------------------------------------------------------------------------------

// float or bf16 bits <-> float, with the kernel's own conversions.
using norm::to_f;

template <typename T>
T from_float(float v) {
  T out;
  norm::store(&out, v);
  return out;
}

int64_t& mismatches() {
  static int64_t n = 0;
  return n;
}
int64_t& compared() {
  static int64_t n = 0;
  return n;
}

template <typename T>
void check_rms_row(std::mt19937& rng, int64_t d, float eps, float scale) {
  constexpr bool kBf16 = sizeof(T) == 2;
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<T> x(d), w(d), out(d);
  for (auto& v : x) v = from_float<T>(dist(rng) * scale);
  for (auto& v : w) v = from_float<T>(dist(rng) * 2.0f);
  norm::row(x.data(), w.data(), d, eps, out.data());
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(to_f(x[i])) * to_f(x[i]);
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + static_cast<double>(eps));
  // float32 statistics: the sum of squares in 16 lanes then across, mean, +eps, sqrt, divide,
  // and the products: relative error at most about (d / 16 + 16 + 8) float32 roundings
  const double rel = (static_cast<double>(d) / 16.0 + 24.0) * std::ldexp(1.0, -24);
  for (int64_t i = 0; i < d; ++i) {
    const double normed = to_f(x[i]) * inv, wv = to_f(w[i]), exact = wv * normed, got = to_f(out[i]);
    CHECK(std::isfinite(got));
    if (!kBf16) {
      CHECK(std::fabs(got - exact) <= rel * std::fabs(exact) + 1e-37);
    } else {
      // the normalized value is cast to bf16 (half an ulp, plus the float32 error), the weight
      // multiplies it, and the product rounds once more (half an ulp)
      const double bound = std::fabs(wv) * (0.5 * ulp_bf16(std::fabs(normed) * (1.0 + rel)) + rel * std::fabs(normed)) +
                           0.5 * ulp_bf16(std::fmax(std::fabs(got), std::fabs(exact))) + 1e-37;
      CHECK(std::fabs(got - exact) <= bound);
    }
  }
  if (kBf16) {
    // The same rounding points as the reference (LlamaRMSNorm): cast the normalized value to
    // bf16, multiply by the weight, round again. Emulated with the statistics rounded once to
    // float32; the kernel's own float32 statistics differ from that by an ulp or so, which
    // changes a rounding only rarely (without the first cast, ~10% of the elements would differ).
    const float inv_f = static_cast<float>(inv);
    int64_t differ = 0;
    for (int64_t i = 0; i < d; ++i) {
      const float n_bf = to_f(from_float<T>(to_f(x[i]) * inv_f));
      differ += out[i] != from_float<T>(to_f(w[i]) * n_bf);
    }
    mismatches() += differ;
    compared() += d;
  }
}

void test_rms_norm_rows() {
  std::mt19937 rng(99);
  for (int64_t d : {1, 2, 15, 16, 17, 31, 96, 576, 1000, 3000})
    for (float eps : {1e-6f, 1e-5f, 0.5f})
      for (float scale : {1e-3f, 1.0f, 100.0f}) {
        check_rms_row<float>(rng, d, eps, scale);
        check_rms_row<uint16_t>(rng, d, eps, scale);
      }
  std::printf("rms_norm bf16: %lld of %lld elements differ from the emulated reference rounding\n",
              static_cast<long long>(mismatches()), static_cast<long long>(compared()));
  CHECK(mismatches() * 200 <= compared());  // at most 0.5%
}

void test_rms_norm_special_rows() {
  // a zero row with eps > 0 normalizes to exact zeros; a constant row to +-weight (rms = |c|)
  std::vector<float> zero(40, 0.0f), w(40, 3.0f), out(40, -1.0f);
  norm::row(zero.data(), w.data(), 40, 1e-5f, out.data());
  for (float v : out) CHECK(v == 0.0f);
  std::vector<float> c(40, -2.5f);
  norm::row(c.data(), w.data(), 40, 0.0f, out.data());
  for (float v : out) CHECK(std::fabs(v + 3.0f) <= 4e-6f);
  std::vector<uint16_t> cb(40, float_to_bf16_rne(4.0f)), wb(40, float_to_bf16_rne(0.5f)), ob(40);
  norm::row(cb.data(), wb.data(), 40, 0.0f, ob.data());
  for (uint16_t v : ob) CHECK(v == float_to_bf16_rne(0.5f));
  // a NaN in the row poisons the whole row (its statistics)
  std::vector<float> nanrow(20, 1.0f), w20(20, 1.0f), o20(20);
  nanrow[13] = std::nanf("");
  norm::row(nanrow.data(), w20.data(), 20, 1e-5f, o20.data());
  for (float v : o20) CHECK(std::isnan(v));
}

// rope::rotate_row equals the scalar formula bit for bit (float_to_bf16_rne after each product
// and after the sum; roll by a modulo index) for every head dim the op takes, on realistic
// values and on any bits at all (NaN, inf, subnormals, both signs).
void test_rope_rows() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int64_t hd : {8, 16, 24, 64, 72, 128, 256})
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<uint16_t> x(hd), c(hd), s(hd), got(hd);
      for (int64_t e = 0; e < hd; ++e) {
        if (kind == 0) {
          x[e] = float_to_bf16_rne(normal(rng));
          c[e] = float_to_bf16_rne(std::cos(normal(rng)));
          s[e] = float_to_bf16_rne(std::sin(normal(rng)));
        } else {
          x[e] = static_cast<uint16_t>(rng()), c[e] = static_cast<uint16_t>(rng()), s[e] = static_cast<uint16_t>(rng());
        }
      }
      idefics3_kit::rope::rotate_row(x.data(), c.data(), s.data(), hd, got.data());
      for (int64_t e = 0; e < hd; ++e) {
        const float a = bf16_bits_to_float(float_to_bf16_rne(bf16_bits_to_float(x[e]) * bf16_bits_to_float(c[e])));
        const float r = bf16_bits_to_float(x[(e + hd / 2) % hd]);
        const float t = bf16_bits_to_float(float_to_bf16_rne(r * bf16_bits_to_float(s[e])));
        CHECK(got[e] == float_to_bf16_rne(a + t));
      }
    }
}

}  // namespace

TEST_MAIN(test_bf16_round_trip_every_value(); test_float_to_bf16_rounding_and_nan();
          test_gemv_against_double_and_between_paths(); test_gemv_propagates_nan_and_inf();
          test_gemv_amx_against_double_and_the_loop(); test_gemv_amx_propagates_nan_and_inf();
          test_rms_norm_rows(); test_rms_norm_special_rows(); test_rope_rows();)
