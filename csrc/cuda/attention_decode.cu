// Split-KV decode attention + LSE combine. Plain CUDA C++.
//
// Decode is memory bound (≈1 FLOP per byte of KV), so it runs on the CUDA cores: a key row is
// read by D/8 lanes with one 16-byte load each (K, then V), the query heads of a GQA group
// (up to 8 per CTA) are all scored against it while it is in registers, and each group of D/8
// lanes keeps its own online-softmax state; the states are merged across lanes, warps, and (in a
// second kernel, when the key range is split over CTAs) across splits with their log-sum-exp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention.cuh"

namespace idefics3_kit {
namespace cuda {
namespace dec {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeads = 8;  // query heads per CTA (larger groups use several CTAs)

template <typename T>
__device__ __forceinline__ void unpack8(const uint4 u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    } else {
      __half2 h;
      *reinterpret_cast<uint32_t*>(&h) = w[i];
      const float2 v = __half22float2(h);
      f[2 * i] = v.x;
      f[2 * i + 1] = v.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  unpack8<T>(*reinterpret_cast<const uint4*>(p), f);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Merge online-softmax state (m, l, acc) with another one (log2 domain).
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[8], float mo, float lo,
                                            const float (&acco)[8]) {
  const float mn = fmaxf(m, mo);
  if (mn == -INFINITY) return;  // both empty
  const float a = exp2f(m - mn), bo = exp2f(mo - mn);
  l = l * a + lo * bo;
#pragma unroll
  for (int i = 0; i < 8; i++) acc[i] = acc[i] * a + acco[i] * bo;
  m = mn;
}

// grid: (num_splits, Hkv * head_chunks, B)
template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_kernel(const AttnDecodeParams p) {
  constexpr int kLPK = D / 8;          // lanes per key row
  constexpr int kKPW = 32 / kLPK;      // keys per warp step
  constexpr int kStep = kWarps * kKPW; // keys per CTA step
  static_assert(D == 64 || D == 128, "decode head dim");

  const int split = blockIdx.x, b = blockIdx.z;
  const int group = p.Hq / p.Hkv;
  const int chunks = (group + G - 1) / G;
  const int hk = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int h_first = hk * group + chunk * G;
  const int nh = min(G, group - chunk * G);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub = lane / kLPK, dl = lane % kLPK;  // key slot in the warp, 8-dim slice

  int kv_len = p.Lk;
  if (p.cache_seqlens) kv_len = max(0, min(p.Lk, p.cache_seqlens[b]));
  const uint8_t* M = p.key_mask ? p.key_mask + b * p.mask_sb : nullptr;
  // A row with no allowed key attends to every key of [0, kv_len) (attention_ref's build_mask
  // on the cache sliced to its valid length).
  bool use_mask = false;
  if (M) {
    int any = 0;
    for (int j = threadIdx.x; j < kv_len && !any; j += kThreads) any = M[j] != 0;
    use_mask = __syncthreads_or(any) != 0;
  }
  // Splits share the valid range [0, kv_len) (read on the device, so a short sequence in a long
  // static cache still spreads over all splits).
  const int per_split = (kv_len + p.num_splits - 1) / p.num_splits;
  const int j_begin = split * per_split;
  const int j_end = min(kv_len, j_begin + per_split);

  const T* K = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh + dl * 8;
  const T* V = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh + dl * 8;
  float q[G][8];
#pragma unroll
  for (int h = 0; h < G; h++) {
    if (h < nh) {
      load8<T>(static_cast<const T*>(p.q) + b * p.q_sb + (h_first + h) * p.q_sh + dl * 8, q[h]);
#pragma unroll
      for (int i = 0; i < 8; i++) q[h][i] *= p.scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; i++) q[h][i] = 0.f;
    }
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; h++) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) acc[h][i] = 0.f;
  }

  // kU keys per lane per iteration: all their K/V loads are issued before the first is used.
  constexpr int kU = G <= 4 ? 4 : 2;
  for (int base = j_begin + warp * kKPW; base < j_end; base += kStep * kU) {
    uint4 kr[kU], vr[kU];
    bool ok[kU];
#pragma unroll
    for (int u = 0; u < kU; u++) {
      const int j = base + u * kStep + sub;
      const bool in = j < j_end;
      kr[u] = in ? *reinterpret_cast<const uint4*>(K + j * p.k_sl) : make_uint4(0u, 0u, 0u, 0u);
      vr[u] = in ? *reinterpret_cast<const uint4*>(V + j * p.v_sl) : make_uint4(0u, 0u, 0u, 0u);
      ok[u] = in && (!use_mask || M[j] != 0);
    }
#pragma unroll
    for (int u = 0; u < kU; u++) {
      float kf[8], vf[8];
      unpack8<T>(kr[u], kf);
      unpack8<T>(vr[u], vf);
#pragma unroll
      for (int h = 0; h < G; h++) {
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) s = fmaf(q[h][i], kf[i], s);
#pragma unroll
        for (int off = kLPK / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (ok[u]) {
          const float mn = fmaxf(m[h], s);
          const float a = exp2f(m[h] - mn), pj = exp2f(s - mn);
          l[h] = l[h] * a + pj;
#pragma unroll
          for (int i = 0; i < 8; i++) acc[h][i] = fmaf(pj, vf[i], acc[h][i] * a);
          m[h] = mn;
        }
      }
    }
  }

  // merge the key slots of a warp (lanes with the same dl)
#pragma unroll
  for (int off = kLPK; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < G; h++) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[h], off);
      float ao[8];
#pragma unroll
      for (int i = 0; i < 8; i++) ao[i] = __shfl_xor_sync(0xffffffffu, acc[h][i], off);
      merge_state(m[h], l[h], acc[h], mo, lo, ao);
    }
  }
  // merge the warps through shared memory
  __shared__ float s_m[kWarps][G], s_l[kWarps][G];
  __shared__ float s_acc[kWarps][G][D];
  if (sub == 0) {
#pragma unroll
    for (int h = 0; h < G; h++) {
      if (dl == 0) {
        s_m[warp][h] = m[h];
        s_l[warp][h] = l[h];
      }
#pragma unroll
      for (int i = 0; i < 8; i++) s_acc[warp][h][dl * 8 + i] = acc[h][i];
    }
  }
  __syncthreads();
  // thread -> (head, dim) of the result
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int h = idx / D, d = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; w++) mm = fmaxf(mm, s_m[w][h]);
    float ll = 0.f, aa = 0.f;
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; w++) {
        const float f = exp2f(s_m[w][h] - mm);
        ll += s_l[w][h] * f;
        aa += s_acc[w][h][d] * f;
      }
    }
    const int hq = h_first + h;
    if (p.num_splits == 1) {
      T* O = static_cast<T*>(p.o) + b * p.o_sb + hq * p.o_sh;
      O[d] = from_float<T>(ll > 0.f ? aa / ll : 0.f);
    } else {
      const int64_t row = (static_cast<int64_t>(b) * p.Hq + hq) * p.num_splits + split;
      p.partial_o[row * D + d] = ll > 0.f ? aa / ll : 0.f;
      if (d == 0) p.partial_lse[row] = ll > 0.f ? mm + log2f(ll) : -INFINITY;
    }
  }
}

// grid: B * Hq; block: D threads
template <typename T>
__global__ void combine_kernel(const AttnDecodeParams p) {
  const int row = blockIdx.x;  // b * Hq + hq
  const int b = row / p.Hq, hq = row % p.Hq, d = threadIdx.x;
  const float* lse = p.partial_lse + static_cast<int64_t>(row) * p.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; s++) mx = fmaxf(mx, lse[s]);
  float num = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.num_splits; s++) {
      const float w = exp2f(lse[s] - mx);
      den += w;
      num += w * p.partial_o[(static_cast<int64_t>(row) * p.num_splits + s) * p.D + d];
    }
  }
  T* O = static_cast<T*>(p.o) + b * p.o_sb + hq * p.o_sh;
  O[d] = from_float<T>(den > 0.f ? num / den : 0.f);
}

template <typename T, int D, int G>
cudaError_t launch_typed(const AttnDecodeParams& p, cudaStream_t stream) {
  const int group = p.Hq / p.Hkv;
  const int chunks = (group + G - 1) / G;
  dim3 grid(p.num_splits, p.Hkv * chunks, p.B);
  decode_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || p.num_splits == 1) return e;
  combine_kernel<T><<<p.B * p.Hq, D, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_g(const AttnDecodeParams& p, cudaStream_t stream) {
  const int group = p.Hq / p.Hkv;
  if (group <= 1) return launch_typed<T, D, 1>(p, stream);
  if (group <= 2) return launch_typed<T, D, 2>(p, stream);
  if (group <= 4) return launch_typed<T, D, 4>(p, stream);
  return launch_typed<T, D, kMaxHeads>(p, stream);
}

template <typename T>
cudaError_t launch_d(const AttnDecodeParams& p, cudaStream_t stream) {
  if (p.D == 64) return launch_g<T, 64>(p, stream);
  if (p.D == 128) return launch_g<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace dec

bool attention_decode_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

int attention_decode_num_splits(int B, int Hq, int Hkv, int Lk, int num_sms) {
  const int group = Hkv > 0 ? Hq / Hkv : 1;
  const int chunks = (group + dec::kMaxHeads - 1) / dec::kMaxHeads;
  const long items = static_cast<long>(B) * Hkv * chunks;
  if (items <= 0 || Lk <= 0) return 1;
  const long target = 2L * (num_sms > 0 ? num_sms : 108);  // about two waves of CTAs
  long splits = (target + items - 1) / items;
  const long max_by_len = (Lk + 255) / 256;  // at least 256 keys per split
  if (splits > max_by_len) splits = max_by_len;
  if (splits > 128) splits = 128;
  if (splits < 1) splits = 1;
  return static_cast<int>(splits);
}

cudaError_t launch_attention_decode(const AttnDecodeParams& p, AttnDType dtype, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0) return cudaSuccess;
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0 || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.partial_o == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
  return dtype == AttnDType::kBFloat16 ? dec::launch_d<__nv_bfloat16>(p, stream) : dec::launch_d<__half>(p, stream);
}

}  // namespace cuda
}  // namespace idefics3_kit
