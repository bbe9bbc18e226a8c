// Host-side plan for the GPU preprocessing op (torch-free, CUDA-free).
//
// From the per-image geometry (the 8 ints of preprocess_into plus the input size) it derives
// every resize pass (Pillow's rules: identical size = alias, a pass skipped when its axis is
// unchanged, pass order as pillow::vertical_first, horizontal-first passes only over the rows
// the vertical pass reads), the workspace layout of the uint8 intermediates, the LANCZOS
// coefficient tables (cached per (in, out) size and de-duplicated per call) and the tile list,
// and packs all of it into one byte blob that is uploaded with a single copy.
//
// Phase 1 (constructor): sizes only. Phase 2 (build): given the device addresses of the input
// images and of the workspace and of the blob itself, emit the jobs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pillow_coeffs.h"
#include "preprocess.cuh"

namespace idefics3_kit {
namespace cuda {

struct ImageGeometry {
  int64_t in_h, in_w;                                    // input uint8 [in_h, in_w, 3]
  int64_t sample, first_tile, h1, w1, h2, w2, rows, cols;  // as in preprocess_into
};

// Process-wide cache of quantized coefficient tables keyed by (in_size, out_size).
inline std::shared_ptr<const pillow::FlatCoeffs> cached_coeffs(int in_size, int out_size) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, std::shared_ptr<const pillow::FlatCoeffs>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(in_size, out_size);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 512) cache.clear();  // bounded; tables are cheap to rebuild
  auto a = std::make_shared<const pillow::FlatCoeffs>(pillow::precompute_coeffs(in_size, out_size));
  cache.emplace(key, a);
  return a;
}

// [3, 256] float32 table of transformers' rescale + normalize, bit-exact with
// idefics3_kit.ops.preprocess.normalize_lut: float32(float64(u) * rescale), then
// (x - float32(mean[c])) / float32(std[c]) in float32.
inline void normalize_lut(const double* mean, const double* std, double rescale, float* lut) {
  for (int c = 0; c < 3; c++) {
    const float m = static_cast<float>(mean[c]), s = static_cast<float>(std[c]);
    for (int u = 0; u < 256; u++) {
      volatile float scaled = static_cast<float>(static_cast<double>(u) * rescale);
      volatile float diff = scaled - m;
      lut[c * 256 + u] = diff / s;
    }
  }
}

// One Pillow resize of a uint8 [h, w, channels] image (the resize_u8 op): at most two passes.
struct SingleResizePlan {
  std::vector<ResampleJob> jobs;  // in order; src/dst patched by the caller via the flags below
  std::vector<int> src_is_tmp, dst_is_tmp;
  std::vector<int32_t> coeffs, bounds;
  int64_t tmp_bytes = 0;

  SingleResizePlan(int h, int w, int c, int oh, int ow) {
    auto add = [&](int axis, int src_w, int dst_w, int dst_rows, int row0, int in_size, int out_size, int s_tmp,
                   int d_tmp) {
      auto a = cached_coeffs(in_size, out_size);
      ResampleJob j{};
      j.src_w = src_w;
      j.dst_w = dst_w;
      j.dst_rows = dst_rows;
      j.axis = axis;
      j.row0 = row0;
      j.ksize = a->ksize;
      j.coeff_off = static_cast<int32_t>(coeffs.size());
      j.bounds_off = static_cast<int32_t>(bounds.size());
      j.channels = c;
      coeffs.insert(coeffs.end(), a->coeffs.begin(), a->coeffs.end());
      bounds.insert(bounds.end(), a->bounds.begin(), a->bounds.end());
      jobs.push_back(j);
      src_is_tmp.push_back(s_tmp);
      dst_is_tmp.push_back(d_tmp);
    };
    if (h == oh && w == ow) return;
    if (h == oh) {
      add(0, w, ow, oh, 0, w, ow, 0, 0);
    } else if (w == ow) {
      add(1, w, ow, oh, 0, h, oh, 0, 0);
    } else if (pillow::vertical_first(h, w, oh, ow)) {
      tmp_bytes = static_cast<int64_t>(oh) * w * c;
      add(1, w, w, oh, 0, h, oh, 0, 1);
      add(0, w, ow, oh, 0, w, ow, 1, 0);
    } else {
      auto cv = cached_coeffs(h, oh);
      const int y_first = cv->bounds[0];
      const int y_last = cv->bounds[(oh - 1) * 2] + cv->bounds[(oh - 1) * 2 + 1];
      tmp_bytes = static_cast<int64_t>(y_last - y_first) * ow * c;
      add(0, w, ow, y_last - y_first, y_first, w, ow, 0, 1);
      add(1, ow, ow, oh, y_first, h, oh, 1, 0);
    }
  }
};

class PreprocessPlan {
 public:
  static constexpr int kChannels = 3;
  static constexpr int kMaxSteps = 6;  // 3 resizes x 2 passes

  // Where a stage's uint8 image lives: an input image (index) or a workspace offset.
  struct Buf {
    int input = -1;      // >= 0: input image index
    int64_t offset = 0;  // else: byte offset in the workspace
    int64_t w = 0;       // width in pixels (row stride w * 3)
  };
  struct Pass {
    Buf src, dst;
    int axis, dst_w, dst_rows, row0, in_size, out_size;
  };

  PreprocessPlan(std::vector<ImageGeometry> images, int64_t tile, int64_t tiles_per_sample)
      : images_(std::move(images)), tile_(tile), tiles_per_sample_(tiles_per_sample) {
    passes_.resize(images_.size());
    tiles_.resize(images_.size());
    for (size_t i = 0; i < images_.size(); i++) plan_image(i);
  }

  int64_t workspace_bytes() const { return ws_bytes_; }
  size_t num_images() const { return images_.size(); }

  // Phase 2. `inputs[i]` is the device address of input image i (HWC uint8, packed rows),
  // `workspace` of workspace_bytes() bytes, `blob_dev` the device address the blob will be
  // copied to. Fills blob() and the launch list.
  void build(const std::vector<const uint8_t*>& inputs, uint8_t* workspace, const uint8_t* blob_dev,
             const float* lut /* [3*256], copied into the blob */) {
    if (inputs.size() != images_.size()) throw std::invalid_argument("PreprocessPlan: inputs/images mismatch");
    auto addr = [&](const Buf& b) -> uint8_t* {
      return b.input >= 0 ? const_cast<uint8_t*>(inputs[b.input]) : workspace + b.offset;
    };
    // coefficient tables, de-duplicated
    std::vector<int32_t> coeffs, bounds;
    std::map<std::pair<int, int>, std::pair<int, int>> where;  // (in,out) -> (coeff_off, bounds_off)
    auto table = [&](int in_size, int out_size) {
      auto key = std::make_pair(in_size, out_size);
      auto it = where.find(key);
      if (it != where.end()) return it->second;
      auto a = cached_coeffs(in_size, out_size);
      std::pair<int, int> off(static_cast<int>(coeffs.size()), static_cast<int>(bounds.size()));
      coeffs.insert(coeffs.end(), a->coeffs.begin(), a->coeffs.end());
      bounds.insert(bounds.end(), a->bounds.begin(), a->bounds.end());
      where.emplace(key, off);
      return off;
    };
    std::vector<std::vector<ResampleJob>> steps(kMaxSteps);
    for (size_t i = 0; i < images_.size(); i++) {
      for (size_t s = 0; s < passes_[i].size(); s++) {
        const Pass& p = passes_[i][s];
        auto off = table(p.in_size, p.out_size);
        ResampleJob j{};
        j.src = addr(p.src);
        j.dst = addr(p.dst);
        j.src_w = static_cast<int32_t>(p.src.w);
        j.dst_w = p.dst_w;
        j.dst_rows = p.dst_rows;
        j.axis = p.axis;
        j.row0 = p.row0;
        j.ksize = cached_coeffs(p.in_size, p.out_size)->ksize;
        j.coeff_off = off.first;
        j.bounds_off = off.second;
        j.channels = kChannels;
        steps[s].push_back(j);
      }
    }
    std::vector<EmitJob> emits;
    const int64_t blocks_per_tile = (tile_ * tile_ + kEmitThreads - 1) / kEmitThreads;
    int64_t emit_blocks = 0;
    for (size_t i = 0; i < images_.size(); i++) {
      for (const auto& t : tiles_[i]) {
        EmitJob e{};
        e.src = addr(t.first) + t.second;
        e.src_w = static_cast<int32_t>(t.first.w);
        e.out_tile = static_cast<int32_t>(images_[i].sample * tiles_per_sample_ + images_[i].first_tile +
                                          static_cast<int64_t>(&t - tiles_[i].data()));
        e.block_start = static_cast<int32_t>(emit_blocks);
        emit_blocks += blocks_per_tile;
        emits.push_back(e);
      }
    }
    // pack: [steps jobs...][emit jobs][lut][coeffs][bounds], 16-byte aligned sections
    blob_.clear();
    launches_.clear();
    auto align = [&]() { blob_.resize((blob_.size() + 15) / 16 * 16, 0); };
    auto append = [&](const void* p, size_t n) {
      align();
      size_t at = blob_.size();
      blob_.resize(at + n);
      if (n) std::memcpy(blob_.data() + at, p, n);
      return at;
    };
    std::vector<std::pair<size_t, size_t>> step_at;
    for (auto& js : steps) {
      int64_t blocks = 0;
      for (auto& j : js) {
        j.block_start = static_cast<int32_t>(blocks);
        blocks += (resample_job_bytes(j) + kResampleThreads - 1) / kResampleThreads;
      }
      if (blocks > INT32_MAX) throw std::invalid_argument("preprocess: too many pixels for one launch");
      size_t at = append(js.data(), js.size() * sizeof(ResampleJob));
      if (!js.empty()) launches_.push_back({at, static_cast<int>(js.size()), static_cast<int>(blocks)});
    }
    emit_at_ = append(emits.data(), emits.size() * sizeof(EmitJob));
    emit_jobs_ = static_cast<int>(emits.size());
    emit_blocks_ = static_cast<int>(emit_blocks);
    lut_at_ = append(lut, 3 * 256 * sizeof(float));
    coeff_at_ = append(coeffs.data(), coeffs.size() * sizeof(int32_t));
    bounds_at_ = append(bounds.data(), bounds.size() * sizeof(int32_t));
    align();
    if (blob_dev) blob_dev_ = blob_dev;
  }

  // The device address of the uploaded blob (known only once blob().size() is).
  void set_blob_device(const uint8_t* blob_dev) { blob_dev_ = blob_dev; }

  struct Launch {
    size_t at;
    int njobs, blocks;
  };
  const std::vector<uint8_t>& blob() const { return blob_; }
  // Valid after build(); pointers are into the device copy of the blob.
  const std::vector<Launch>& resample_launches() const { return launches_; }
  const ResampleJob* jobs_dev(const Launch& l) const { return reinterpret_cast<const ResampleJob*>(blob_dev_ + l.at); }
  const EmitJob* emit_dev() const { return reinterpret_cast<const EmitJob*>(blob_dev_ + emit_at_); }
  int emit_jobs() const { return emit_jobs_; }
  int emit_blocks() const { return emit_blocks_; }
  const float* lut_dev() const { return reinterpret_cast<const float*>(blob_dev_ + lut_at_); }
  const int32_t* coeffs_dev() const { return reinterpret_cast<const int32_t*>(blob_dev_ + coeff_at_); }
  const int32_t* bounds_dev() const { return reinterpret_cast<const int32_t*>(blob_dev_ + bounds_at_); }
  // Same, into the host blob (for the host emulation in tests).
  const ResampleJob* jobs_host(const Launch& l) const { return reinterpret_cast<const ResampleJob*>(blob_.data() + l.at); }
  const EmitJob* emit_host() const { return reinterpret_cast<const EmitJob*>(blob_.data() + emit_at_); }
  const float* lut_host() const { return reinterpret_cast<const float*>(blob_.data() + lut_at_); }
  const int32_t* coeffs_host() const { return reinterpret_cast<const int32_t*>(blob_.data() + coeff_at_); }
  const int32_t* bounds_host() const { return reinterpret_cast<const int32_t*>(blob_.data() + bounds_at_); }

 private:
  Buf alloc(int64_t h, int64_t w) {
    Buf b;
    b.offset = ws_bytes_;
    b.w = w;
    ws_bytes_ += (h * w * kChannels + 255) / 256 * 256;
    return b;
  }

  // Pillow resize of `src` (h x w) to (oh x ow); returns where the result lives.
  Buf resize(size_t i, const Buf& src, int64_t h, int64_t w, int64_t oh, int64_t ow) {
    if (h == oh && w == ow) return src;  // Pillow: identical size = copy; alias instead
    auto& ps = passes_[i];
    const int H = static_cast<int>(h), W = static_cast<int>(w), OH = static_cast<int>(oh),
              OW = static_cast<int>(ow);
    if (h == oh) {  // horizontal only
      Buf dst = alloc(oh, ow);
      ps.push_back({src, dst, 0, OW, OH, 0, W, OW});
      return dst;
    }
    if (w == ow) {  // vertical only
      Buf dst = alloc(oh, ow);
      ps.push_back({src, dst, 1, OW, OH, 0, H, OH});
      return dst;
    }
    if (pillow::vertical_first(H, W, OH, OW)) {
      Buf tmp = alloc(oh, w);
      Buf dst = alloc(oh, ow);
      ps.push_back({src, tmp, 1, W, OH, 0, H, OH});
      ps.push_back({tmp, dst, 0, OW, OH, 0, W, OW});
      return dst;
    }
    auto cv = cached_coeffs(H, OH);
    const int y_first = cv->bounds[0];
    const int y_last = cv->bounds[(OH - 1) * 2] + cv->bounds[(OH - 1) * 2 + 1];
    Buf tmp = alloc(y_last - y_first, ow);
    Buf dst = alloc(oh, ow);
    ps.push_back({src, tmp, 0, OW, y_last - y_first, y_first, W, OW});
    ps.push_back({tmp, dst, 1, OW, OH, y_first, H, OH});
    return dst;
  }

  void plan_image(size_t i) {
    const ImageGeometry& g = images_[i];
    Buf in;
    in.input = static_cast<int>(i);
    in.w = g.in_w;
    Buf s1 = resize(i, in, g.in_h, g.in_w, g.h1, g.w1);
    Buf s2 = resize(i, s1, g.h1, g.w1, g.h2, g.w2);
    auto& tl = tiles_[i];
    if (g.rows * g.cols > 0) {
      for (int64_t r = 0; r < g.rows; r++)
        for (int64_t c = 0; c < g.cols; c++) tl.push_back({s2, (r * tile_ * g.w2 + c * tile_) * kChannels});
      Buf gl = resize(i, s2, g.h2, g.w2, tile_, tile_);
      tl.push_back({gl, 0});
    } else {
      tl.push_back({s2, 0});
    }
  }

  std::vector<ImageGeometry> images_;
  int64_t tile_, tiles_per_sample_;
  int64_t ws_bytes_ = 0;
  std::vector<std::vector<Pass>> passes_;
  std::vector<std::vector<std::pair<Buf, int64_t>>> tiles_;  // (image, byte offset of the tile)
  std::vector<uint8_t> blob_;
  std::vector<Launch> launches_;
  size_t emit_at_ = 0, lut_at_ = 0, coeff_at_ = 0, bounds_at_ = 0;
  int emit_jobs_ = 0, emit_blocks_ = 0;
  const uint8_t* blob_dev_ = nullptr;
};

}  // namespace cuda
}  // namespace idefics3_kit
