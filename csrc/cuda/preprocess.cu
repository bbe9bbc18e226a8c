// GPU preprocessing kernels: Pillow-exact LANCZOS passes and the tile normalize/write.
// Plain CUDA C++ (no torch headers); the torch binding is preprocess_binding.cpp.
//
// Many images per launch: a launch takes an array of jobs (one per image and pass, or per
// tile) with a prefix sum of their block counts; each block finds its job by binary search.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "preprocess.cuh"

namespace idefics3_kit {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kResampleThreads)
    resample_kernel(const ResampleJob* __restrict__ jobs, int njobs, const int32_t* __restrict__ coeffs,
                    const int32_t* __restrict__ bounds) {
  int job;
  const int64_t i = resample_index(jobs, njobs, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x), &job);
  if (i < 0) return;
  const ResampleJob& j = jobs[job];
  j.dst[i] = resample_byte(j, i, coeffs, bounds);
}

template <OutDType kOut>
__device__ __forceinline__ void store_value(void* out, int64_t idx, float v) {
  if constexpr (kOut == OutDType::kFloat32) {
    static_cast<float*>(out)[idx] = v;
  } else if constexpr (kOut == OutDType::kBFloat16) {
    static_cast<uint16_t*>(out)[idx] = float_to_bf16_bits(v);
  } else {
    static_cast<__half*>(out)[idx] = __float2half_rn(v);
  }
}

template <OutDType kOut>
__global__ void __launch_bounds__(kEmitThreads)
    emit_kernel(const EmitJob* __restrict__ jobs, int njobs, int tile, const float* __restrict__ lut,
                void* __restrict__ pixel_values, void* __restrict__ mask, int mask_elem_bytes,
                uint64_t mask_one) {
  __shared__ float s_lut[3 * 256];
  for (int t = threadIdx.x; t < 3 * 256; t += blockDim.x) s_lut[t] = lut[t];
  __syncthreads();
  int job;
  const int64_t p = emit_pixel(jobs, njobs, static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x), tile, &job);
  if (p < 0) return;
  const EmitJob& j = jobs[job];
  const int64_t plane = static_cast<int64_t>(tile) * tile;
  const int y = static_cast<int>(p / tile), x = static_cast<int>(p - static_cast<int64_t>(y) * tile);
  const uint8_t* s = j.src + (static_cast<int64_t>(y) * j.src_w + x) * 3;
  const int64_t base = static_cast<int64_t>(j.out_tile) * 3 * plane + p;
#pragma unroll
  for (int c = 0; c < 3; c++) store_value<kOut>(pixel_values, base + c * plane, s_lut[c * 256 + s[c]]);
  const int64_t m = static_cast<int64_t>(j.out_tile) * plane + p;
  switch (mask_elem_bytes) {
    case 1: static_cast<uint8_t*>(mask)[m] = static_cast<uint8_t>(mask_one); break;
    case 2: static_cast<uint16_t*>(mask)[m] = static_cast<uint16_t>(mask_one); break;
    case 4: static_cast<uint32_t*>(mask)[m] = static_cast<uint32_t>(mask_one); break;
    default: static_cast<uint64_t*>(mask)[m] = mask_one; break;
  }
}

}  // namespace

cudaError_t launch_resample(const ResampleJob* jobs, int njobs, int total_blocks, const int32_t* coeffs,
                            const int32_t* bounds, cudaStream_t stream) {
  if (njobs <= 0 || total_blocks <= 0) return cudaSuccess;
  resample_kernel<<<total_blocks, kResampleThreads, 0, stream>>>(jobs, njobs, coeffs, bounds);
  return cudaGetLastError();
}

cudaError_t launch_emit(const EmitJob* jobs, int njobs, int total_blocks, int tile, const float* lut,
                        void* pixel_values, OutDType out_dtype, void* mask, int mask_elem_bytes,
                        uint64_t mask_one, cudaStream_t stream) {
  if (njobs <= 0 || total_blocks <= 0) return cudaSuccess;
  switch (out_dtype) {
    case OutDType::kFloat32:
      emit_kernel<OutDType::kFloat32><<<total_blocks, kEmitThreads, 0, stream>>>(
          jobs, njobs, tile, lut, pixel_values, mask, mask_elem_bytes, mask_one);
      break;
    case OutDType::kBFloat16:
      emit_kernel<OutDType::kBFloat16><<<total_blocks, kEmitThreads, 0, stream>>>(
          jobs, njobs, tile, lut, pixel_values, mask, mask_elem_bytes, mask_one);
      break;
    case OutDType::kFloat16:
      emit_kernel<OutDType::kFloat16><<<total_blocks, kEmitThreads, 0, stream>>>(
          jobs, njobs, tile, lut, pixel_values, mask, mask_elem_bytes, mask_one);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace idefics3_kit
