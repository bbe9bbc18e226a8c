// Torch-free test of gelu_tanh_'s kernel (csrc/include/idefics3_kit/activation.h): the dispatched
// path (AVX-512, with or without AVX-512 BF16, or AVX2), each vector path the CPU has, and the
// portable loop, float32 and bf16, against
// gelu_tanh in double (as x * sigmoid(2y), which does not cancel in the tail): within one bf16 ulp,
// or 8 float32 ulps plus the tail's conditioning (2|y| ulps); specials (NaN, +-inf, +-0, huge);
// every length from 0 to 70 in buffers sized exactly, so ASan sees a masked tail read or written
// past its end.
#include <idefics3_kit/activation.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"

namespace act = idefics3_kit::act;
using idefics3_kit::bf16_bits_to_float;
using idefics3_kit::float_to_bf16_rne;

namespace {

double y_of(double x) { return 0.7978845608028654 * (x + 0.044715 * x * x * x); }
double gelu64(double x) { return x / (1.0 + std::exp(-2.0 * y_of(x))); }

bool close_f32(float x, float got) {
  const double ref = gelu64(x);
  if (std::isnan(ref) || std::isinf(x)) return true;  // specials are checked exactly below
  const double bound = 1.1920928955078125e-07 * (8 + 4 * std::fabs(y_of(x))) * std::fabs(ref) +
                       1.1754943508222875e-38 * std::fabs(x) + 1e-37;
  return std::fabs(got - ref) <= bound;
}

bool close_bf16(uint16_t xb, uint16_t gotb) {
  const float x = bf16_bits_to_float(xb);
  const double ref = gelu64(x), got = bf16_bits_to_float(gotb);
  if (std::isnan(ref) || std::isinf(x)) return true;
  const double ulp = std::ldexp(1.0, std::ilogb(std::fabs(ref) > 1e-30 ? ref : 1e-30) - 7);
  return std::fabs(got - ref) <= ulp + 1e-38;
}

template <typename Run>
void check_lengths_f32(Run run, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int n = 0; n <= 70; ++n) {
    std::vector<float> x(n), y(n);
    for (auto& v : x) v = normal(rng);
    y = x;
    run(y.data(), n);
    for (int i = 0; i < n; ++i) CHECK(close_f32(x[i], y[i]));
  }
}

template <typename Run>
void check_lengths_bf16(Run run, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int n = 0; n <= 70; ++n) {
    std::vector<uint16_t> x(n), y(n);
    for (auto& v : x) v = float_to_bf16_rne(normal(rng));
    y = x;
    run(y.data(), n);
    for (int i = 0; i < n; ++i) CHECK(close_bf16(x[i], y[i]));
  }
}

// Exactly torch's results: NaN -> NaN, +inf -> +inf, -inf -> NaN, +-0 -> +-0, huge x -> x, huge
// negative x -> -0.
template <typename Run>
void check_specials(Run run) {
  const float in[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e30f, -1e30f, 3e38f, -3e38f};
  float x[9];
  for (int i = 0; i < 9; ++i) x[i] = in[i];
  run(x, 9);
  CHECK(std::isnan(x[0]));
  CHECK(x[1] == INFINITY);
  CHECK(std::isnan(x[2]));
  CHECK(x[3] == 0.0f && !std::signbit(x[3]));
  CHECK(x[4] == 0.0f && std::signbit(x[4]));
  CHECK(x[5] == 1e30f && x[7] == 3e38f);
  CHECK(x[6] == 0.0f && std::signbit(x[6]) && x[8] == 0.0f && std::signbit(x[8]));
}

void test_dispatched_and_portable() {
  std::mt19937 rng(3);
  auto fast_f = [](float* x, int64_t n) { act::gelu_tanh_inplace(x, n); };
  auto fast_b = [](uint16_t* x, int64_t n) { act::gelu_tanh_inplace(x, n); };
  auto port_f = [](float* x, int64_t n) { act::gelu_tanh_portable(x, n); };
  auto port_b = [](uint16_t* x, int64_t n) { act::gelu_tanh_portable(x, n); };
  check_lengths_f32(fast_f, rng);
  check_lengths_f32(port_f, rng);
  check_lengths_bf16(fast_b, rng);
  check_lengths_bf16(port_b, rng);
  check_specials(fast_f);
  check_specials(port_f);
#ifdef IK_HAVE_AVX512_PATH
  if (idefics3_kit::attn::avx512::available()) {  // the AVX-512 path without the BF16 conversion too
    check_lengths_bf16([](uint16_t* x, int64_t n) { act::avx512::gelu_tanh(x, n); }, rng);
    check_lengths_f32([](float* x, int64_t n) { act::avx512::gelu_tanh(x, n); }, rng);
  }
#endif
#ifdef IK_HAVE_AVX2_DECODE
  if (idefics3_kit::attn::avx2::available()) {  // (on AVX-512 CPUs too, where it is not dispatched)
    auto avx2_f = [](float* x, int64_t n) { act::avx2::gelu_tanh(x, n); };
    auto avx2_b = [](uint16_t* x, int64_t n) { act::avx2::gelu_tanh(x, n); };
    check_lengths_f32(avx2_f, rng);
    check_lengths_bf16(avx2_b, rng);
    check_specials(avx2_f);
    // the bf16 path's specials: NaN, +inf, -inf (NaN), +-0, a huge negative value (-0), a negative
    // NaN, the largest bf16; twice, so that both go through the 8-lane loop
    uint16_t b[16];
    const uint16_t in[] = {0x7FC0, 0x7F80, 0xFF80, 0x0000, 0x8000, 0xFF7F, 0xFFC1, 0x7F7F};
    for (int i = 0; i < 16; ++i) b[i] = in[i % 8];
    avx2_b(b, 16);
    for (int i = 0; i < 16; i += 8) {
      CHECK(std::isnan(bf16_bits_to_float(b[i])) && b[i + 1] == 0x7F80 && std::isnan(bf16_bits_to_float(b[i + 2])));
      CHECK(b[i + 3] == 0x0000 && b[i + 4] == 0x8000 && b[i + 5] == 0x8000);
      CHECK(std::isnan(bf16_bits_to_float(b[i + 6])) && b[i + 7] == 0x7F7F);  // a NaN stays one; huge x is x
    }
  }
#endif
}

// A sweep of every bf16 value from -12 to 12: all within one ulp of the double result.
void test_bf16_sweep() {
  std::vector<uint16_t> x, y;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float v = bf16_bits_to_float(static_cast<uint16_t>(b));
    if (std::isfinite(v) && std::fabs(v) <= 12.0f) x.push_back(static_cast<uint16_t>(b));
  }
  y = x;
  act::gelu_tanh_inplace(y.data(), static_cast<int64_t>(y.size()));
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) bad += !close_bf16(x[i], y[i]);
  CHECK(bad == 0);
}

}  // namespace

TEST_MAIN(test_dispatched_and_portable(); test_bf16_sweep();)
