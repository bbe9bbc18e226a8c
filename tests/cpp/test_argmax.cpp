// Torch-free test of the argmax_last kernel (csrc/include/idefics3_kit/argmax.h): the vectorized
// two-pass row against the float comparison itself (row_reference), for float32 and bfloat16
// rows of every length up to a few blocks and a vocabulary-sized one, with ties, signed zeros,
// infinities and NaNs of either sign placed anywhere.
#include <idefics3_kit/argmax.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"

namespace argmax = idefics3_kit::argmax;

namespace {

uint16_t bf16_of(float v) {  // truncation: every value the test uses is exact in bf16
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return static_cast<uint16_t>(b >> 16);
}

float pick_special(std::mt19937& g) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float values[] = {0.0f, -0.0f, inf, -inf, nan, -nan, 3.0f, -3.0f};
  return values[g() % 8];
}

// One row of `n` entries drawn from `levels` small integers (ties across blocks), then `specials`
// special values at random places; checks both dtypes against the reference.
void check_row(std::mt19937& g, int64_t n, int levels, int specials) {
  std::vector<float> f(static_cast<size_t>(n));
  for (auto& v : f) v = static_cast<float>(static_cast<int>(g() % levels) - levels / 2);
  for (int s = 0; s < specials && n > 0; ++s) f[g() % n] = pick_special(g);
  std::vector<uint16_t> h(f.size());
  for (size_t i = 0; i < f.size(); ++i) h[i] = bf16_of(f[i]);
  CHECK(argmax::row(f.data(), n) == argmax::row_reference(f.data(), n));
  CHECK(argmax::row(h.data(), n) == argmax::row_reference(h.data(), n));
}

void test_random_rows() {
  std::mt19937 g(7);
  for (int64_t n = 1; n <= 3 * argmax::kBlock + 5; ++n)
    for (int rep = 0; rep < 20; ++rep) check_row(g, n, 1 + rep % 5, rep % 4);
  for (int rep = 0; rep < 40; ++rep) check_row(g, 49280, 3 + rep, rep % 3);
}

void test_edges() {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  {
    std::vector<float> x(300, -inf);  // all -inf: the first
    CHECK(argmax::row(x.data(), 300) == 0);
    x[299] = -3.0f;  // the last entry
    CHECK(argmax::row(x.data(), 300) == 299);
  }
  {
    std::vector<float> x(200, -1.0f);  // -0 before +0: equal, so the first of them
    x[70] = -0.0f;
    x[150] = 0.0f;
    CHECK(argmax::row(x.data(), 200) == 70);
    x[70] = -1.0f;  // only -0 left in front of +0... and an all -0 maximum
    CHECK(argmax::row(x.data(), 200) == 150);
    x[150] = -1.0f;
    x[90] = -0.0f;
    CHECK(argmax::row(x.data(), 200) == 90);
  }
  {
    std::vector<float> x(500, 1.0f);  // NaN beats +inf; of two NaNs (either sign) the first
    x[10] = inf;
    x[400] = -nan;
    x[450] = nan;
    CHECK(argmax::row(x.data(), 500) == 400);
  }
  {
    std::vector<float> x(100);  // the largest finite floats and the smallest subnormals keep their order
    for (int i = 0; i < 100; ++i) x[i] = std::ldexp(1.0f, -149) * static_cast<float>(i);
    CHECK(argmax::row(x.data(), 100) == 99);
    x[3] = std::numeric_limits<float>::max();
    x[4] = -std::numeric_limits<float>::max();
    CHECK(argmax::row(x.data(), 100) == 3);
  }
}

}  // namespace

TEST_MAIN(test_random_rows(); test_edges();)
