// CUDA implementations of idefics3_kit::preprocess_into and idefics3_kit::resize_u8 (schemas in
// csrc/ops.cpp). Thin: checks, allocation (caching allocator, pinned staging), one upload of
// the plan blob, then the launches of preprocess.cu on the current stream. No host sync.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "preprocess.cuh"
#include "preprocess_plan.h"

namespace idefics3_kit {
namespace cuda {
namespace {

// Pinned host copy of `bytes`, uploaded to `device` on the current stream (non-blocking; the
// caching host allocator keeps the pinned block alive until the copy has run).
at::Tensor upload(const void* bytes, int64_t n, const at::Device& device) {
  at::Tensor pinned = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (n) std::memcpy(pinned.data_ptr(), bytes, static_cast<size_t>(n));
  at::Tensor dev = at::empty({std::max<int64_t>(n, 1)}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(pinned, /*non_blocking=*/true);
  return dev;
}

uint64_t mask_one_bits(at::ScalarType t, int* elem_bytes) {
  switch (t) {
    case at::kBool:
    case at::kByte:
    case at::kChar: *elem_bytes = 1; return 1;
    case at::kShort: *elem_bytes = 2; return 1;
    case at::kInt: *elem_bytes = 4; return 1;
    case at::kLong: *elem_bytes = 8; return 1;
    case at::kFloat: *elem_bytes = 4; return 0x3F800000u;
    case at::kBFloat16: *elem_bytes = 2; return 0x3F80u;
    case at::kHalf: *elem_bytes = 2; return 0x3C00u;
    case at::kDouble: *elem_bytes = 8; return 0x3FF0000000000000ull;
    default: TORCH_CHECK(false, "preprocess_into (CUDA): unsupported pixel_mask dtype ", t);
  }
  return 0;
}

void preprocess_into_cuda(at::TensorList images, at::Tensor pixel_values, at::Tensor pixel_mask,
                          at::IntArrayRef geometry, at::ArrayRef<double> mean, at::ArrayRef<double> std,
                          double rescale) {
  TORCH_CHECK(pixel_values.is_cuda() && pixel_mask.is_cuda(), "preprocess_into (CUDA): outputs must be CUDA tensors");
  TORCH_CHECK(pixel_values.device() == pixel_mask.device(), "preprocess_into (CUDA): outputs on different devices");
  TORCH_CHECK(pixel_values.dim() == 5 && pixel_values.size(2) == 3 && pixel_values.size(3) == pixel_values.size(4),
              "preprocess_into (CUDA): pixel_values must be [B, T, 3, S, S], got ", pixel_values.sizes());
  const int64_t B = pixel_values.size(0), T = pixel_values.size(1), S = pixel_values.size(3);
  TORCH_CHECK(pixel_mask.dim() == 4 && pixel_mask.size(0) == B && pixel_mask.size(1) == T && pixel_mask.size(2) == S &&
                  pixel_mask.size(3) == S,
              "preprocess_into (CUDA): pixel_mask must be [B, T, S, S], got ", pixel_mask.sizes());
  TORCH_CHECK(pixel_values.is_contiguous() && pixel_mask.is_contiguous(),
              "preprocess_into (CUDA): pixel_values and pixel_mask must be contiguous");
  OutDType out_dtype;
  switch (pixel_values.scalar_type()) {
    case at::kFloat: out_dtype = OutDType::kFloat32; break;
    case at::kBFloat16: out_dtype = OutDType::kBFloat16; break;
    case at::kHalf: out_dtype = OutDType::kFloat16; break;
    default: TORCH_CHECK(false, "preprocess_into (CUDA): pixel_values must be float32, bfloat16 or float16");
  }
  int mask_bytes = 1;
  const uint64_t mask_one = mask_one_bits(pixel_mask.scalar_type(), &mask_bytes);
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "preprocess_into (CUDA): mean and std need 3 values");
  const int64_t n = static_cast<int64_t>(images.size());
  TORCH_CHECK(static_cast<int64_t>(geometry.size()) == 8 * n, "preprocess_into (CUDA): geometry needs 8 ints per image");
  TORCH_CHECK(S * S * 3 * B * T < (int64_t{1} << 31) * 256, "preprocess_into (CUDA): batch too large");
  if (n == 0) return;

  const at::Device device = pixel_values.device();
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();

  std::vector<ImageGeometry> geo(static_cast<size_t>(n));
  std::vector<at::Tensor> keep(static_cast<size_t>(n));
  std::vector<int64_t> host_off(static_cast<size_t>(n), -1);
  int64_t host_bytes = 0;
  for (int64_t i = 0; i < n; i++) {
    const at::Tensor& img = images[i];
    TORCH_CHECK(img.scalar_type() == at::kByte && img.dim() == 3 && img.size(2) == 3,
                "preprocess_into (CUDA): image ", i, " must be uint8 [H, W, 3], got ", img.scalar_type(), " ",
                img.sizes());
    TORCH_CHECK(img.is_cpu() || img.device() == device, "preprocess_into (CUDA): image ", i,
                " must be on the CPU or on ", device);
    const int64_t* g = geometry.data() + 8 * i;
    ImageGeometry& gg = geo[static_cast<size_t>(i)];
    gg.in_h = img.size(0);
    gg.in_w = img.size(1);
    gg.sample = g[0]; gg.first_tile = g[1]; gg.h1 = g[2]; gg.w1 = g[3];
    gg.h2 = g[4]; gg.w2 = g[5]; gg.rows = g[6]; gg.cols = g[7];
    const int64_t tiles = gg.rows * gg.cols > 0 ? gg.rows * gg.cols + 1 : 1;
    TORCH_CHECK(gg.in_h > 0 && gg.in_w > 0 && std::min({gg.h1, gg.w1, gg.h2, gg.w2}) > 0,
                "preprocess_into (CUDA): image ", i, ": sizes must be positive");
    TORCH_CHECK(0 <= gg.sample && gg.sample < B && 0 <= gg.first_tile && gg.first_tile + tiles <= T,
                "preprocess_into (CUDA): image ", i, " writes outside pixel_values");
    TORCH_CHECK(gg.rows * gg.cols > 0 ? (gg.h2 == gg.rows * S && gg.w2 == gg.cols * S) : (gg.h2 == S && gg.w2 == S),
                "preprocess_into (CUDA): image ", i, ": stage 2 size does not match the tile grid");
    keep[static_cast<size_t>(i)] = img.contiguous();
    if (img.is_cpu()) {
      host_off[static_cast<size_t>(i)] = host_bytes;
      host_bytes += (img.numel() + 15) / 16 * 16;
    }
  }

  // Host images: one pinned staging buffer, filled in chunks of about 16 MB (images copied in
  // parallel); each chunk's H2D copy is queued as soon as it is staged, so the DMA of chunk i
  // overlaps the staging of chunk i + 1. The caching host allocator is told about the copies
  // (record_event), so the pinned block is reused only after they ran.
  at::Tensor staged_dev;
  if (host_bytes > 0) {
    at::Tensor pinned = at::empty({host_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    staged_dev = at::empty({host_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    uint8_t* hp = pinned.data_ptr<uint8_t>();
    uint8_t* dp = staged_dev.data_ptr<uint8_t>();
    std::vector<int64_t> host_images;
    for (int64_t i = 0; i < n; i++)
      if (host_off[static_cast<size_t>(i)] >= 0) host_images.push_back(i);
    constexpr int64_t kChunkBytes = int64_t{16} << 20;
    size_t k = 0;
    while (k < host_images.size()) {
      size_t e = k;
      int64_t bytes = 0;
      while (e < host_images.size() && (e == k || bytes < kChunkBytes)) {
        bytes += keep[static_cast<size_t>(host_images[e])].numel();
        e++;
      }
      at::parallel_for(static_cast<int64_t>(k), static_cast<int64_t>(e), 1, [&](int64_t begin, int64_t end) {
        for (int64_t x = begin; x < end; x++) {
          const int64_t i = host_images[static_cast<size_t>(x)];
          const at::Tensor& t = keep[static_cast<size_t>(i)];
          std::memcpy(hp + host_off[static_cast<size_t>(i)], t.data_ptr(), static_cast<size_t>(t.numel()));
        }
      });
      const int64_t from = host_off[static_cast<size_t>(host_images[k])];
      const int64_t to = e < host_images.size() ? host_off[static_cast<size_t>(host_images[e])] : host_bytes;
      C10_CUDA_CHECK(cudaMemcpyAsync(dp + from, hp + from, static_cast<size_t>(to - from), cudaMemcpyHostToDevice,
                                     stream));
      k = e;
    }
    at::getHostAllocator(at::kCUDA)->record_event(pinned.data_ptr(), pinned.storage().data_ptr().get_context(),
                                                  at::cuda::getCurrentCUDAStream(device.index()).unwrap());
  }
  std::vector<const uint8_t*> inputs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) {
    inputs[static_cast<size_t>(i)] = host_off[static_cast<size_t>(i)] >= 0
                                         ? staged_dev.data_ptr<uint8_t>() + host_off[static_cast<size_t>(i)]
                                         : keep[static_cast<size_t>(i)].data_ptr<uint8_t>();
  }

  PreprocessPlan plan(std::move(geo), S, T);
  at::Tensor workspace =
      at::empty({std::max<int64_t>(plan.workspace_bytes(), 1)}, at::TensorOptions().dtype(at::kByte).device(device));
  float lut[3 * 256];
  normalize_lut(mean.data(), std.data(), rescale, lut);
  plan.build(inputs, workspace.data_ptr<uint8_t>(), nullptr, lut);
  at::Tensor blob = upload(plan.blob().data(), static_cast<int64_t>(plan.blob().size()), device);
  plan.set_blob_device(blob.data_ptr<uint8_t>());

  for (const auto& l : plan.resample_launches()) {
    C10_CUDA_CHECK(launch_resample(plan.jobs_dev(l), l.njobs, l.blocks, plan.coeffs_dev(), plan.bounds_dev(), stream));
  }
  C10_CUDA_CHECK(launch_emit(plan.emit_dev(), plan.emit_jobs(), plan.emit_blocks(), static_cast<int>(S), plan.lut_dev(),
                             pixel_values.data_ptr(), out_dtype, pixel_mask.data_ptr(), mask_bytes, mask_one, stream));
}

at::Tensor resize_u8_cuda(const at::Tensor& image, int64_t out_h, int64_t out_w) {
  TORCH_CHECK(image.is_cuda() && image.scalar_type() == at::kByte && image.dim() == 3 &&
                  (image.size(2) == 1 || image.size(2) == 3),
              "resize_u8 (CUDA): expects a CUDA uint8 [H, W, C] tensor with C in (1, 3), got ", image.sizes());
  TORCH_CHECK(out_h > 0 && out_w > 0, "resize_u8: output size must be positive");
  TORCH_CHECK(out_h < (1 << 20) && out_w < (1 << 20) && image.size(0) < (1 << 20) && image.size(1) < (1 << 20),
              "resize_u8 (CUDA): size too large");
  c10::cuda::CUDAGuard guard(image.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(image.device().index()).stream();
  const int h = static_cast<int>(image.size(0)), w = static_cast<int>(image.size(1)), c = static_cast<int>(image.size(2));
  at::Tensor src = image.contiguous();
  if (h == out_h && w == out_w) return src.clone();
  at::Tensor out = at::empty({out_h, out_w, c}, image.options());
  SingleResizePlan plan(h, w, c, static_cast<int>(out_h), static_cast<int>(out_w));
  at::Tensor tmp = at::empty({std::max<int64_t>(plan.tmp_bytes, 1)}, image.options().dtype(at::kByte));
  // blob: [jobs][coeffs][bounds]
  std::vector<ResampleJob> jobs = plan.jobs;
  for (size_t k = 0; k < jobs.size(); k++) {
    jobs[k].src = plan.src_is_tmp[k] ? tmp.data_ptr<uint8_t>() : src.data_ptr<uint8_t>();
    jobs[k].dst = plan.dst_is_tmp[k] ? tmp.data_ptr<uint8_t>() : out.data_ptr<uint8_t>();
    jobs[k].block_start = 0;
  }
  const size_t jobs_bytes = (jobs.size() * sizeof(ResampleJob) + 15) / 16 * 16;
  const size_t coeff_bytes = (plan.coeffs.size() * sizeof(int32_t) + 15) / 16 * 16;
  std::vector<uint8_t> bytes(jobs_bytes + coeff_bytes + plan.bounds.size() * sizeof(int32_t), 0);
  std::memcpy(bytes.data(), jobs.data(), jobs.size() * sizeof(ResampleJob));
  std::memcpy(bytes.data() + jobs_bytes, plan.coeffs.data(), plan.coeffs.size() * sizeof(int32_t));
  std::memcpy(bytes.data() + jobs_bytes + coeff_bytes, plan.bounds.data(), plan.bounds.size() * sizeof(int32_t));
  at::Tensor blob = upload(bytes.data(), static_cast<int64_t>(bytes.size()), image.device());
  const uint8_t* base = blob.data_ptr<uint8_t>();
  for (size_t k = 0; k < jobs.size(); k++) {
    const int64_t nb = (resample_job_bytes(jobs[k]) + kResampleThreads - 1) / kResampleThreads;
    TORCH_CHECK(nb < INT32_MAX, "resize_u8 (CUDA): image too large");
    C10_CUDA_CHECK(launch_resample(reinterpret_cast<const ResampleJob*>(base) + k, 1, static_cast<int>(nb),
                                   reinterpret_cast<const int32_t*>(base + jobs_bytes),
                                   reinterpret_cast<const int32_t*>(base + jobs_bytes + coeff_bytes), stream));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CUDA, m) {
  m.impl("preprocess_into", &preprocess_into_cuda);
  m.impl("resize_u8", &resize_u8_cuda);
}

}  // namespace cuda
}  // namespace idefics3_kit
