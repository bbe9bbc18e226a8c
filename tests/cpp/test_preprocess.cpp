// preprocess_into / resize_u8 through the dispatcher: tiles equal the header's resize chain
// pushed through the normalize table, masks set, bad geometry rejected (and, under
// tools/asan_check.sh, no out-of-bounds access anywhere on the way).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <idefics3_kit/pillow_resample.h>

#include <vector>

#include "check.h"

namespace {

struct Serial {
  template <typename F>
  void operator()(int64_t b, int64_t e, F&& f) const { f(b, e); }
};

void call_preprocess(const std::vector<at::Tensor>& images, at::Tensor& pv, at::Tensor& pm,
                     const std::vector<int64_t>& geometry) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("idefics3_kit::preprocess_into", "")
                .typed<void(at::TensorList, at::Tensor, at::Tensor, at::IntArrayRef, at::ArrayRef<double>,
                            at::ArrayRef<double>, double)>();
  std::vector<double> half{0.5, 0.5, 0.5};
  op.call(images, pv, pm, geometry, half, half, 1.0 / 255);
}

std::vector<uint8_t> chain(const at::Tensor& img, int h1, int w1, int h2, int w2) {
  std::vector<uint8_t> s1(h1 * w1 * 3), s2(h2 * w2 * 3);
  idefics3_kit::pillow::resize(img.data_ptr<uint8_t>(), img.size(0), img.size(1), 3, s1.data(), h1, w1, Serial{});
  idefics3_kit::pillow::resize(s1.data(), h1, w1, 3, s2.data(), h2, w2, Serial{});
  return s2;
}

float lut(uint8_t u) { return (static_cast<float>(static_cast<double>(u) * (1.0 / 255)) - 0.5f) / 0.5f; }

void test_tiles_match_header_chain(at::ScalarType dtype) {
  const int s = 16;
  auto img = at::randint(0, 256, {23, 41, 3}, at::kByte);
  // 2 x 3 tiles + global, written at tile 1 of sample 1; stage 1 41 -> 48 wide, stage 2 -> 32 x 48.
  std::vector<int64_t> geometry{1, 1, 27, 48, 32, 48, 2, 3};
  auto pv = at::zeros({2, 9, 3, s, s}, dtype);
  auto pm = at::zeros({2, 9, s, s}, at::kLong);
  call_preprocess({img}, pv, pm, geometry);
  auto stage2 = chain(img, 27, 48, 32, 48);
  auto pvf = pv.to(at::kFloat);
  bool tiles_ok = true;
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 3; ++c)
      for (int ch = 0; ch < 3; ++ch)
        for (int y = 0; y < s; ++y)
          for (int x = 0; x < s; ++x) {
            const float want = at::scalar_tensor(lut(stage2[((r * s + y) * 48 + c * s + x) * 3 + ch]))
                                   .to(dtype).to(at::kFloat).item<float>();
            tiles_ok &= pvf.index({1, 1 + r * 3 + c, ch, y, x}).item<float>() == want;
          }
  CHECK(tiles_ok);
  CHECK(pm.index({1}).narrow(0, 1, 7).eq(1).all().item<bool>());  // 6 tiles + global
  CHECK(pm.index({1, 0}).eq(0).all().item<bool>() && pm.index({1, 8}).eq(0).all().item<bool>());
  CHECK(pm.index({0}).eq(0).all().item<bool>() && pv.index({0}).eq(0).all().item<bool>());
}

void test_bad_geometry_throws() {
  auto img = at::randint(0, 256, {8, 8, 3}, at::kByte);
  auto pv = at::zeros({1, 2, 3, 8, 8});
  auto pm = at::zeros({1, 2, 8, 8}, at::kLong);
  auto throws = [&](std::vector<int64_t> g) {
    try {
      call_preprocess({img}, pv, pm, g);
    } catch (const c10::Error&) {
      return true;
    }
    return false;
  };
  CHECK(throws({0, 1, 8, 8, 16, 8, 2, 1}));   // 3 tiles from tile 1: beyond T = 2
  CHECK(throws({0, 0, 8, 8, 9, 8, 1, 1}));    // stage 2 not rows x S
  CHECK(throws({0, 0, 0, 8, 8, 8, 0, 0}));    // empty stage 1
  CHECK(throws({1, 0, 8, 8, 8, 8, 0, 0}));    // sample out of range
  CHECK(!throws({0, 0, 8, 8, 8, 8, 0, 0}));   // one tile, no resize
}

}  // namespace

TEST_MAIN(test_tiles_match_header_chain(at::kFloat); test_tiles_match_header_chain(at::kBFloat16);
          test_bad_geometry_throws();)
