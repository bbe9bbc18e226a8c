// Torch-free tests of the Pillow-exact resize kernel (csrc/include/idefics3_kit/pillow_resample.h).
#include <idefics3_kit/pillow_resample.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "check.h"

using idefics3_kit::pillow::lanczos_coeffs;
using idefics3_kit::pillow::resize;

namespace {

struct Case {
  int h, w, c, oh, ow;
  std::vector<uint8_t> in, expected;  // expected = Pillow 13 Image.resize(LANCZOS, reducing_gap=None)
};

// Generated once with Pillow 13.0 (tests/ops covers thousands of sizes against Pillow itself).
const Case kCases[] = {
    {4, 5, 3, 3, 7, {255, 228, 34, 121, 243, 189, 6, 131, 102, 168, 82, 193, 187, 150, 81, 243, 205, 24, 236, 8,
                     246, 164, 231, 36, 210, 111, 172, 210, 174, 176, 218, 242, 169, 114, 205, 63, 160, 47, 212, 79,
                     72, 112, 120, 222, 69, 31, 95, 108, 36, 109, 238, 69, 51, 81, 228, 211, 202, 58, 202, 65},
     {255, 220, 0, 219, 186, 147, 106, 166, 204, 43, 173, 67, 147, 108, 160, 216, 113, 175, 197, 157, 105,
      245, 243, 96, 212, 154, 127, 180, 96, 148, 178, 145, 128, 143, 88, 132, 149, 132, 133, 174, 212, 128,
      78, 130, 133, 54, 163, 164, 41, 116, 167, 88, 30, 131, 175, 122, 178, 133, 209, 124, 53, 210, 43}},
    {6, 1, 1, 2, 3, {193, 88, 107, 214, 72, 3}, {144, 144, 144, 91, 91, 91}},
    // Height shrinks more than twice the width's change: Pillow 13 runs the vertical pass first.
    {9, 2, 3, 2, 3, {248, 194, 190, 207, 147, 26, 237, 21, 245, 211, 239, 45, 5, 157, 159, 60, 54, 236,
                     109, 46, 199, 82, 32, 205, 36, 7, 134, 222, 57, 146, 8, 149, 14, 15, 22, 10,
                     144, 208, 24, 24, 7, 41, 11, 85, 59, 104, 225, 110, 226, 201, 8, 159, 26, 27},
     {117, 89, 191, 129, 96, 157, 141, 102, 122, 75, 141, 42, 81, 97, 62, 86, 52, 81}},
    {3, 3, 3, 3, 1, {78, 39, 248, 185, 251, 31, 108, 241, 181, 41, 163, 225, 204, 92, 230, 130, 195, 142,
                     192, 240, 132, 27, 235, 249, 54, 172, 100},
     {128, 182, 144, 131, 146, 201, 86, 217, 167}},
};

struct Serial {
  template <typename F>
  void operator()(int64_t b, int64_t e, F&& f) const { f(b, e); }
};

// Splits every range into single items, as a many-threaded run would.
struct OneByOne {
  template <typename F>
  void operator()(int64_t b, int64_t e, F&& f) const {
    for (int64_t i = b; i < e; ++i) f(i, i + 1);
  }
};

void test_known_outputs() {
  for (const Case& c : kCases) {
    std::vector<uint8_t> out(c.oh * c.ow * c.c, 0);
    resize(c.in.data(), c.h, c.w, c.c, out.data(), c.oh, c.ow, Serial{});
    CHECK(out == c.expected);
  }
}

void test_coefficients_sum_to_one() {
  for (auto [in, out] : {std::pair{100, 7}, {7, 100}, {2048, 512}, {1, 4000}, {4000, 1}}) {
    auto cx = lanczos_coeffs(in, out);
    for (int x = 0; x < out; ++x) {
      int64_t sum = 0;
      for (int t = 0; t < cx.count[x]; ++t) sum += cx.k[x * cx.ksize + t];
      CHECK(sum > (1 << 22) - cx.ksize && sum < (1 << 22) + cx.ksize);  // 22-bit fixed point, rounding only
      CHECK(cx.first[x] >= 0 && cx.first[x] + cx.count[x] <= in && cx.count[x] <= cx.ksize);
    }
  }
}

void test_constant_image_stays_constant() {
  for (int value : {0, 1, 128, 254, 255}) {
    std::vector<uint8_t> in(37 * 53 * 3, static_cast<uint8_t>(value)), out(29 * 71 * 3);
    resize(in.data(), 37, 53, 3, out.data(), 29, 71, Serial{});
    bool same = true;
    for (uint8_t v : out) same &= v == value;
    CHECK(same);
  }
}

void test_parallel_split_is_identical() {
  std::vector<uint8_t> in(61 * 47 * 3);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  for (auto [oh, ow] : {std::pair{20, 90}, {130, 10}, {61, 20}, {9, 47}}) {
    std::vector<uint8_t> a(oh * ow * 3), b(oh * ow * 3);
    resize(in.data(), 61, 47, 3, a.data(), oh, ow, Serial{});
    resize(in.data(), 61, 47, 3, b.data(), oh, ow, OneByOne{});
    CHECK(a == b);
  }
}

void test_same_size_copies() {
  std::vector<uint8_t> in(5 * 4 * 3), out(5 * 4 * 3, 7);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<uint8_t>(i * 5);
  resize(in.data(), 5, 4, 3, out.data(), 5, 4, Serial{});
  CHECK(in == out);
}

// The 16-bit pair kernel (AVX-512 VBMI + VNNI) and the plain 32-bit loop give the same bytes for every
// lane count (full 64-lane blocks, 32-lane and partial tails), odd and even tap counts, and
// pixels at the extremes (sums that clip below 0 and above 255).
void test_pair_kernel_matches_plain_loop() {
  using namespace idefics3_kit::pillow;
  std::vector<uint8_t> src(300 * 160);
  for (size_t i = 0; i < src.size(); ++i) {
    const uint32_t r = static_cast<uint32_t>(i * 2654435761u) >> 11;
    src[i] = (r & 7) == 0 ? 0 : ((r & 7) == 1 ? 255 : static_cast<uint8_t>(r >> 3));
  }
  int checked = 0;
  for (auto [in, out] : {std::pair{100, 7}, {7, 100}, {2048, 512}, {40, 39}, {13, 2}, {300, 150}, {4000, 3}}) {
    const AxisCoeffs c = lanczos_coeffs(in, out);
    CHECK(c.pairs_ok);
    for (int x = 0; x < out; x += std::max(1, out / 9)) {
      for (int n : {1, 5, 31, 32, 33, 63, 64, 65, 100, 128, 160}) {
        const ptrdiff_t step = in > 1000 ? 8 : 160;  // rows overlap for the long kernels: still valid input
        if ((c.count[x] - 1) * step + n > static_cast<ptrdiff_t>(src.size())) continue;
        std::vector<uint8_t> plain(n + 1, 7), fast(n + 1, 7);
        weighted_rows_plain(src.data(), step, c.count[x], &c.k[static_cast<size_t>(x) * c.ksize], plain.data(), n);
#ifdef IK_RESAMPLE_AVX512
        if (resample_avx512_pairs())
          weighted_rows_pairs(src.data(), step, c.count[x], &c.pair_hi[static_cast<size_t>(x) * c.kpairs],
                              &c.pair_lo[static_cast<size_t>(x) * c.kpairs], fast.data(), n);
        else
          fast = plain;
#else
        fast = plain;
#endif
        CHECK(plain == fast);  // includes the guard byte past n: left untouched by both
        ++checked;
      }
    }
  }
  CHECK(checked > 100);

  // 20000 -> 1 over white: 20000 taps, so sum(255 * lo) passes 2^31 and only the wrap-around
  // of the int32 lanes makes 2^11 * sum(hi) + sum(lo) come out right.
  const AxisCoeffs wide = lanczos_coeffs(20000, 1);
  const std::vector<uint8_t> white(20000 + 64, 255);
  std::vector<uint8_t> plain(64), fast(64, 0);
  weighted_rows_plain(white.data(), 1, wide.count[0], wide.k.data(), plain.data(), 64);
#ifdef IK_RESAMPLE_AVX512
  if (resample_avx512_pairs())
    weighted_rows_pairs(white.data(), 1, wide.count[0], wide.pair_hi.data(), wide.pair_lo.data(), fast.data(), 64);
  else
    fast = plain;
#else
  fast = plain;
#endif
  CHECK(wide.count[0] == 20000 && plain == std::vector<uint8_t>(64, 255) && fast == plain);
}

}  // namespace

TEST_MAIN(test_known_outputs(); test_coefficients_sum_to_one(); test_constant_image_stays_constant();
          test_parallel_split_is_identical(); test_same_size_copies(); test_pair_kernel_matches_plain_loop();)
