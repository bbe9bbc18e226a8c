// preprocess_into on CPU: for each image, the LANCZOS resize chain, the tiles and the global
// tile, rescale + normalize through a lookup table, written straight into the padded batch.
// Specification: idefics3_kit/ops/preprocess.py (preprocess_into_ref).
#include <idefics3_kit/pillow_resample.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <memory>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif
#include <vector>

#include "common.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kMaxSide = 1 << 16;

struct Geometry {
  int64_t sample, first, h1, w1, h2, w2, rows, cols;
  int64_t tiles() const { return rows > 0 && cols > 0 ? rows * cols + 1 : 1; }
};

// The 256-entry tables of normalize_lut: float32(float64(u) * rescale), then (x - mean) / std
// in float32 (transformers' order and precision); bf16 entries round that float to nearest even.
struct Lut {
  std::array<std::array<float, 256>, 3> f32;
  std::array<std::array<c10::BFloat16, 256>, 3> bf16;
};

Lut make_lut(at::ArrayRef<double> mean, at::ArrayRef<double> std, double rescale) {
  Lut lut;
  for (int c = 0; c < 3; ++c) {
    const float m = static_cast<float>(mean[c]), s = static_cast<float>(std[c]);
    for (int u = 0; u < 256; ++u) {
      const float scaled = static_cast<float>(static_cast<double>(u) * rescale);
      lut.f32[c][u] = (scaled - m) / s;
      lut.bf16[c][u] = c10::BFloat16(lut.f32[c][u]);
    }
  }
  return lut;
}

void check_image(const at::Tensor& img, size_t i) {
  const char* op = "preprocess_into";
  const std::string name = "images[" + std::to_string(i) + "]";
  check_cpu(img, op, name.c_str());
  check_dtype(img, at::kByte, op, name.c_str());
  check_dim(img, 3, op, name.c_str());
  check_contiguous(img, op, name.c_str());
  TORCH_CHECK(img.size(2) == 3, op, ": ", name, " must be [H, W, 3] RGB, got shape ", shape_str(img));
  TORCH_CHECK(img.size(0) >= 1 && img.size(1) >= 1 && img.size(0) <= kMaxSide && img.size(1) <= kMaxSide, op, ": ",
              name, " size must be in [1, ", kMaxSide, "], got ", shape_str(img));
}

Geometry check_geometry(at::IntArrayRef g, size_t i, const at::Tensor& pv) {
  const char* op = "preprocess_into";
  Geometry geo{g[8 * i], g[8 * i + 1], g[8 * i + 2], g[8 * i + 3], g[8 * i + 4], g[8 * i + 5], g[8 * i + 6],
               g[8 * i + 7]};
  const int64_t b = pv.size(0), t = pv.size(1), s = pv.size(3);
  for (int64_t v : {geo.h1, geo.w1, geo.h2, geo.w2})
    TORCH_CHECK(v >= 1 && v <= kMaxSide, op, ": geometry of image ", i, ": sizes must be in [1, ", kMaxSide,
                "], got (h1, w1, h2, w2) = (", geo.h1, ", ", geo.w1, ", ", geo.h2, ", ", geo.w2, ")");
  TORCH_CHECK(geo.rows >= 0 && geo.cols >= 0 && geo.rows <= kMaxSide && geo.cols <= kMaxSide, op,
              ": geometry of image ", i, ": rows/cols must be >= 0, got ", geo.rows, "x", geo.cols);
  // (first <= t - tiles rather than first + tiles <= t: a huge first must not overflow past the check)
  TORCH_CHECK(geo.sample >= 0 && geo.sample < b && geo.first >= 0 && geo.tiles() <= t && geo.first <= t - geo.tiles(),
              op, ": image ", i,
              " writes ", geo.tiles(), " tile(s) from tile ", geo.first, " of sample ", geo.sample,
              ", outside pixel_values ", shape_str(pv));
  if (geo.rows == 0 || geo.cols == 0) {
    TORCH_CHECK(geo.h2 == s && geo.w2 == s, op, ": image ", i, " is unsplit, so stage 2 must be ", s, "x", s,
                ", got ", geo.h2, "x", geo.w2);
  } else {
    TORCH_CHECK(geo.h2 == geo.rows * s && geo.w2 == geo.cols * s, op, ": image ", i, ": stage 2 ", geo.h2, "x",
                geo.w2, " is not ", geo.rows, "x", geo.cols, " tiles of ", s);
  }
  return geo;
}

// No two images may write the same tile of a sample: the tiles are written in parallel, and the
// result would depend on the order (the reference's last image wins).
void check_disjoint(const std::vector<Geometry>& geos) {
  std::vector<size_t> order(geos.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::tie(geos[a].sample, geos[a].first, a) < std::tie(geos[b].sample, geos[b].first, b);
  });
  for (size_t n = 1; n < order.size(); ++n) {
    const Geometry &prev = geos[order[n - 1]], &cur = geos[order[n]];
    TORCH_CHECK(cur.sample != prev.sample || cur.first >= prev.first + prev.tiles(), "preprocess_into: images ",
                std::min(order[n - 1], order[n]), " and ", std::max(order[n - 1], order[n]), " both write tile ",
                cur.first, " of sample ", cur.sample, " (tiles ", prev.first, "..", prev.first + prev.tiles() - 1,
                " and ", cur.first, "..", cur.first + cur.tiles() - 1, ")");
  }
}

// Uninitialized byte buffer (std::vector would zero megabytes that the resize overwrites).
using Buffer = std::unique_ptr<uint8_t[]>;

// Resize a contiguous [h, w, 3] buffer to [oh, ow, 3] (a copy when the size is unchanged).
Buffer resize_buffer(const uint8_t* src, int64_t h, int64_t w, int64_t oh, int64_t ow) {
  Buffer out(new uint8_t[static_cast<size_t>(oh * ow * 3)]);
  pillow::resize(src, static_cast<int>(h), static_cast<int>(w), 3, out.get(), static_cast<int>(oh),
                 static_cast<int>(ow), AtParallel{});
  return out;
}

// S x S tiles of HWC uint8 images (tile j's top-left pixel at tile_src[j], rows `stride` bytes
// apart) -> planes [3, S, S] of out_t at dst + j * 3 * S * S, through the LUT, one pass over
// each source row. One parallel region for all tiles and their mask entries (items: bands of
// tile rows, then one item per tile mask), handed out dynamically.
template <typename out_t>
void write_tiles(const std::vector<const uint8_t*>& tile_src, const std::vector<int64_t>& strides, int64_t s,
                 const std::array<std::array<out_t, 256>, 3>& lut, out_t* dst, const at::Tensor& mask_tiles) {
  const int64_t n = static_cast<int64_t>(tile_src.size()), band = 32, bands = (s + band - 1) / band;
  const auto &t0 = lut[0], &t1 = lut[1], &t2 = lut[2];
  struct None {};
  parallel_items<None>(n * bands + n, [&](None&, int64_t it) {
    if (it >= n * bands) {
      mask_tiles.select(0, it - n * bands).fill_(1);
      return;
    }
    const int64_t j = it / bands, y0 = (it % bands) * band, y1 = std::min(s, y0 + band);
    for (int64_t y = y0; y < y1; ++y) {
      const uint8_t* src = tile_src[j] + y * strides[j];
      out_t* d0 = dst + (j * 3 * s + y) * s;
      out_t* d1 = d0 + s * s;
      out_t* d2 = d1 + s * s;
      for (int64_t x = 0; x < s; ++x) {
        d0[x] = t0[src[3 * x]];
        d1[x] = t1[src[3 * x + 1]];
        d2[x] = t2[src[3 * x + 2]];
      }
    }
  });
}

template <typename out_t>
void process_image(const at::Tensor& img, const Geometry& g, const std::array<std::array<out_t, 256>, 3>& lut,
                   at::Tensor& pixel_values, at::Tensor& pixel_mask) {
  const int64_t s = pixel_values.size(3);
  Buffer stage2;
  {
    Buffer stage1 = resize_buffer(img.data_ptr<uint8_t>(), img.size(0), img.size(1), g.h1, g.w1);
    stage2 = resize_buffer(stage1.get(), g.h1, g.w1, g.h2, g.w2);
  }
  std::vector<const uint8_t*> tiles;  // row-major tiles, then the global tile
  std::vector<int64_t> strides;
  Buffer global;
  const int64_t stride = g.w2 * 3;
  if (g.rows > 0 && g.cols > 0) {
    for (int64_t r = 0; r < g.rows; ++r)
      for (int64_t c = 0; c < g.cols; ++c) {
        tiles.push_back(stage2.get() + r * s * stride + c * s * 3);
        strides.push_back(stride);
      }
    global = resize_buffer(stage2.get(), g.h2, g.w2, s, s);
  }
  tiles.push_back(global ? global.get() : stage2.get());  // unsplit: stage 2 is the one S x S tile
  strides.push_back(s * 3);
  out_t* dst = pixel_values.select(0, g.sample).select(0, g.first).data_ptr<out_t>();
  write_tiles<out_t>(tiles, strides, s, lut, dst, pixel_mask.select(0, g.sample).narrow(0, g.first, g.tiles()));
}

// Ask for transparent huge pages on the (usually freshly allocated, untouched) outputs: tens of
// megabytes faulted in 4 KiB pages cost about as much as the resizes. Only a hint; pages
// already touched are unaffected and failure is harmless.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.numel() * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

void preprocess_into_cpu(at::TensorList images, at::Tensor pixel_values, at::Tensor pixel_mask,
                         at::IntArrayRef geometry, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                         double rescale) {
  const char* op = "preprocess_into";
  check_cpu(pixel_values, op, "pixel_values");
  check_cpu(pixel_mask, op, "pixel_mask");
  check_dim(pixel_values, 5, op, "pixel_values");
  check_contiguous(pixel_values, op, "pixel_values");
  TORCH_CHECK(pixel_values.scalar_type() == at::kFloat || pixel_values.scalar_type() == at::kBFloat16, op,
              ": pixel_values must be float32 or bfloat16, got ", pixel_values.scalar_type());
  // (S = 0 passes here: every image is then refused by its geometry, and no image is no work)
  TORCH_CHECK(pixel_values.size(2) == 3 && pixel_values.size(3) == pixel_values.size(4), op,
              ": pixel_values must be [B, T, 3, S, S], got ", shape_str(pixel_values));
  const auto b = pixel_values.size(0), t = pixel_values.size(1), s = pixel_values.size(3);
  TORCH_CHECK(pixel_mask.sizes() == at::IntArrayRef({b, t, s, s}), op, ": pixel_mask must be [", b, ", ", t, ", ", s,
              ", ", s, "], got ", shape_str(pixel_mask));
  TORCH_CHECK(geometry.size() == 8 * images.size(), op, ": geometry needs 8 ints per image, got ", geometry.size(),
              " for ", images.size(), " images");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, op, ": mean and std need 3 values, got ", mean.size(), " and ",
              std.size());
  for (int c = 0; c < 3; ++c) TORCH_CHECK(std[c] != 0.0, op, ": std[", c, "] must be non-zero");
  std::vector<Geometry> geos;
  for (size_t i = 0; i < images.size(); ++i) {
    check_image(images[i], i);
    geos.push_back(check_geometry(geometry, i, pixel_values));
  }
  check_disjoint(geos);
  const Lut lut = make_lut(mean, std, rescale);
  advise_huge_pages(pixel_values);
  if (pixel_mask.is_contiguous()) advise_huge_pages(pixel_mask);
  for (size_t i = 0; i < images.size(); ++i) {
    if (pixel_values.scalar_type() == at::kFloat)
      process_image<float>(images[i], geos[i], lut.f32, pixel_values, pixel_mask);
    else
      process_image<c10::BFloat16>(images[i], geos[i], lut.bf16, pixel_values, pixel_mask);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("preprocess_into", &preprocess_into_cpu); }

}  // namespace idefics3_kit
