// GPU preprocessing (resize chain + tiles + normalize) -- torch-free launch interface.
//
// Included by preprocess.cu (nvcc), by preprocess_binding.cpp (host compiler, with torch) and by
// the host-only test (g++, without CUDA): the job structs and the per-element functions below
// are plain C++ (marked __host__ __device__ under nvcc) so the host test runs exactly the
// arithmetic the kernels run.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define I3K_HD __host__ __device__ __forceinline__
#else
#define I3K_HD inline
#endif

#if !defined(I3K_NO_CUDA_RUNTIME)
#include <cuda_runtime.h>
#endif

namespace idefics3_kit {
namespace cuda {

constexpr int kResampleThreads = 256;  // one thread per output byte, 256 bytes per block
constexpr int kEmitThreads = 256;      // one thread per output pixel of a tile
constexpr int kPrecisionBits = 22;

// One separable pass (horizontal or vertical) of one Pillow LANCZOS resize of one image.
// Images are HWC uint8 with `channels` interleaved channels and rows packed (stride = w * C).
struct ResampleJob {
  const uint8_t* src;
  uint8_t* dst;
  int32_t src_w;        // source width in pixels (row stride src_w * channels bytes)
  int32_t dst_w;        // destination width in pixels
  int32_t dst_rows;     // destination rows produced by this pass
  int32_t axis;         // 0 = horizontal, 1 = vertical
  int32_t row0;         // horizontal: source row read for destination row 0;
                        // vertical: subtracted from the (absolute) bounds
  int32_t ksize;        // coefficients per output position
  int32_t coeff_off;    // first int32 of this axis' table in the coefficient array
  int32_t bounds_off;   // first int32 of this axis' (xmin, count) pairs in the bounds array
  int32_t block_start;  // first block of this job in the launch (prefix sum)
  int32_t channels;
};

// One S×S tile to normalize and write: a window of an HWC uint8 RGB image.
struct EmitJob {
  const uint8_t* src;   // top-left pixel of the tile
  int32_t src_w;        // width of the image the tile is cut from (row stride src_w * 3)
  int32_t out_tile;     // flat tile index into pixel_values viewed as [B * T, 3, S, S]
  int32_t block_start;  // first block of this job in the launch (prefix sum)
  int32_t pad_;
};

enum class OutDType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

I3K_HD int64_t resample_job_bytes(const ResampleJob& j) {
  return static_cast<int64_t>(j.dst_rows) * j.dst_w * j.channels;
}

I3K_HD uint8_t clip8(int32_t ss) {
  const int32_t v = ss >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Output byte `i` (0 <= i < resample_job_bytes(j)) of a pass: Pillow's int32 fixed-point sum in
// tap order, from 1 << 21, clipped.
I3K_HD uint8_t resample_byte(const ResampleJob& j, int64_t i, const int32_t* coeffs, const int32_t* bounds) {
  const int c = j.channels;
  const int64_t row_bytes = static_cast<int64_t>(j.dst_w) * c;
  const int y = static_cast<int>(i / row_bytes);
  const int rem = static_cast<int>(i - y * row_bytes);
  const int x = rem / c;
  const int ch = rem - x * c;
  int32_t ss = 1 << (kPrecisionBits - 1);
  if (j.axis == 0) {
    const int xmin = bounds[j.bounds_off + 2 * x], cnt = bounds[j.bounds_off + 2 * x + 1];
    const int32_t* k = coeffs + j.coeff_off + static_cast<int64_t>(x) * j.ksize;
    const uint8_t* s = j.src + (static_cast<int64_t>(y + j.row0) * j.src_w + xmin) * c + ch;
    for (int t = 0; t < cnt; t++) ss += static_cast<int32_t>(s[static_cast<int64_t>(t) * c]) * k[t];
  } else {
    const int ymin = bounds[j.bounds_off + 2 * y] - j.row0, cnt = bounds[j.bounds_off + 2 * y + 1];
    const int32_t* k = coeffs + j.coeff_off + static_cast<int64_t>(y) * j.ksize;
    const int64_t stride = static_cast<int64_t>(j.src_w) * c;
    const uint8_t* s = j.src + static_cast<int64_t>(ymin) * stride + static_cast<int64_t>(x) * c + ch;
    for (int t = 0; t < cnt; t++) ss += static_cast<int32_t>(s[t * stride]) * k[t];
  }
  return clip8(ss);
}

// The job of block `block` in a launch: the last job whose block_start <= block (binary search).
template <typename Job>
I3K_HD int find_job(const Job* jobs, int njobs, int block) {
  int lo = 0, hi = njobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (jobs[mid].block_start <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Emit: thread (block, tid) of a launch -> (job index, pixel p of the S×S tile) or p < 0 if idle.
I3K_HD int64_t emit_pixel(const EmitJob* jobs, int njobs, int block, int tid, int tile, int* job) {
  *job = find_job(jobs, njobs, block);
  const int64_t p = static_cast<int64_t>(block - jobs[*job].block_start) * kEmitThreads + tid;
  return p < static_cast<int64_t>(tile) * tile ? p : -1;
}

// Resample: thread (block, tid) -> (job index, output byte i) or i < 0 if idle.
I3K_HD int64_t resample_index(const ResampleJob* jobs, int njobs, int block, int tid, int* job) {
  *job = find_job(jobs, njobs, block);
  const int64_t i = static_cast<int64_t>(block - jobs[*job].block_start) * kResampleThreads + tid;
  return i < resample_job_bytes(jobs[*job]) ? i : -1;
}

// float -> bfloat16 / float16 bits, round to nearest even (as torch's .to()); finite inputs.
I3K_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if !defined(I3K_NO_CUDA_RUNTIME)
// --- launch functions (preprocess.cu). All take device pointers and run on `stream`; no host
// synchronisation. `jobs` lie in device memory; total_blocks = sum of the jobs' block counts.
cudaError_t launch_resample(const ResampleJob* jobs, int njobs, int total_blocks, const int32_t* coeffs,
                            const int32_t* bounds, cudaStream_t stream);
// pixel_values: contiguous [B*T, 3, S, S] of out_dtype; mask: contiguous [B*T, S, S] with
// mask_elem_bytes (1, 2, 4 or 8) bytes per element, each written with the low bytes of mask_one.
// lut: [3, 256] float32.
cudaError_t launch_emit(const EmitJob* jobs, int njobs, int total_blocks, int tile, const float* lut,
                        void* pixel_values, OutDType out_dtype, void* mask, int mask_elem_bytes,
                        uint64_t mask_one, cudaStream_t stream);
#endif

}  // namespace cuda
}  // namespace idefics3_kit
