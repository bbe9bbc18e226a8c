// resize_u8 on CPU: Pillow-exact LANCZOS resize of a uint8 [H, W, C] image (C = 1 or 3).
#include <idefics3_kit/pillow_resample.h>

#include "common.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kMaxSide = 1 << 16;  // keeps every index and fixed-point sum inside int32

at::Tensor resize_u8_cpu(const at::Tensor& image, int64_t out_h, int64_t out_w) {
  const char* op = "resize_u8";
  check_cpu(image, op, "image");
  check_dtype(image, at::kByte, op, "image");
  check_dim(image, 3, op, "image");
  check_contiguous(image, op, "image");
  const int64_t h = image.size(0), w = image.size(1), c = image.size(2);
  TORCH_CHECK(c == 1 || c == 3, op, ": image must have 1 or 3 channels (last dim), got ", c);
  TORCH_CHECK(h >= 1 && w >= 1 && h <= kMaxSide && w <= kMaxSide, op, ": image size must be in [1, ", kMaxSide,
              "], got ", h, "x", w);
  TORCH_CHECK(out_h >= 1 && out_w >= 1 && out_h <= kMaxSide && out_w <= kMaxSide, op,
              ": output size must be in [1, ", kMaxSide, "], got ", out_h, "x", out_w);
  at::Tensor out = at::empty({out_h, out_w, c}, image.options());
  pillow::resize(image.data_ptr<uint8_t>(), static_cast<int>(h), static_cast<int>(w), static_cast<int>(c),
                 out.data_ptr<uint8_t>(), static_cast<int>(out_h), static_cast<int>(out_w), AtParallel{});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("resize_u8", &resize_u8_cpu); }

}  // namespace idefics3_kit
