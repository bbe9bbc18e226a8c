// Flash-attention-style forward kernel (mma.sync m16n8k16 + m16n8k8), shared by the per-head-dim
// translation units attention_fwd_hd{64,72,128}.cu. Plain CUDA C++.
//
// CTA: 4 warps, 64 query rows (16 per warp) of one (batch, query head); key tiles of 64.
// Shared memory: one K tile and one V tile (the Q tile is staged through the K buffer once and
// kept in registers). K of tile j+1 is prefetched with cp.async while the softmax and P·V of
// tile j run; V of tile j+1 while S of tile j+1 is computed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention.cuh"

namespace idefics3_kit {
namespace cuda {
namespace fwd {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kThreads = 128;

template <typename T>
struct MmaTraits;
template <>
struct MmaTraits<__nv_bfloat16> {
  static __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct MmaTraits<__half> {
  static __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void mma1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x1(uint32_t& r0, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(smem_u32(p)));
}

// Padded shared-memory row (elements): an odd number of 16-byte chunks keeps ldmatrix
// conflict-free (72 = 9 chunks already is).
template <int D>
struct Smem {
  static constexpr int kChunks = D / 8;
  static constexpr int kRow = (kChunks % 2 == 0) ? D + 8 : D;
};

// Copy `rows` (<= 64) rows of D elements starting at global row `row0` into a [64][kRow] tile;
// rows >= valid_rows are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t stride_l, int row0, int valid_rows) {
  constexpr int kChunks = D / 8;
  constexpr int kRow = Smem<D>::kRow;
  for (int c = threadIdx.x; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, k = c - r * kChunks;
    const bool ok = r < valid_rows;
    const T* src = g + (ok ? (static_cast<int64_t>(row0 + r) * stride_l + k * 8) : 0);
    cp_async_16(s + r * kRow + k * 8, src, ok);
  }
}

template <typename T, int D, bool kCausal>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const AttnFwdParams p) {
  using MT = MmaTraits<T>;
  constexpr int kRow = Smem<D>::kRow;
  constexpr int kK16 = D / 16;              // full k16 steps of Q·Kᵀ
  constexpr bool kTail = (D % 16) == 8;     // one m16n8k8 step (D = 72)
  constexpr int kND = D / 8;                // n8 blocks of the output
  constexpr int kNB = kBN / 8;              // n8 blocks of a score tile
  static_assert(D % 8 == 0 && D <= 256, "head dim");
  static_assert(kK16 % 2 == 0, "Q·Kᵀ loads B fragments two k16 steps at a time");

  __shared__ __align__(16) T sK[kBN * kRow];
  __shared__ __align__(16) T sV[kBN * kRow];
  __shared__ uint8_t sMask[kBN];
  __shared__ int sFirstValid;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int qb = kCausal ? (gridDim.x - 1 - blockIdx.x) : blockIdx.x;  // heavy causal blocks first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / (p.Hq / p.Hkv);
  const int q0 = qb * kBM;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_sb + hq * p.q_sh;
  const T* K = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* V = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const uint8_t* M = p.key_mask ? p.key_mask + b * p.mask_sb : nullptr;
  const int Lq = p.Lq, Lk = p.Lk;
  const int pos_off = Lk - Lq;  // causal: query i sits at key position pos_off + i

  // Q tile -> registers (staged through sK).
  load_tile<T, D>(sK, Q, p.q_sl, q0, min(kBM, Lq - q0));
  cp_async_commit();
  // First allowed key of this batch row (key mask only): decides which rows are "opened".
  if (threadIdx.x == 0) sFirstValid = Lk;
  __syncthreads();
  if (M) {
    int first = Lk;
    for (int j = threadIdx.x; j < Lk; j += kThreads) {
      if (M[j]) {
        first = j;
        break;
      }
    }
    if (first < Lk) atomicMin(&sFirstValid, first);
  }
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[kK16 > 0 ? kK16 : 1][4];
  uint32_t qt0 = 0, qt1 = 0;
#pragma unroll
  for (int ks = 0; ks < kK16; ks++) {
    ldsm_x4(qf[ks], sK + (warp * 16 + (lane % 16)) * kRow + ks * 16 + (lane / 16) * 8);
  }
  if constexpr (kTail) {
    ldsm_x2(qt0, qt1, sK + (warp * 16 + (lane % 16)) * kRow + kK16 * 16);
  }
  const int first_valid = sFirstValid;
  __syncthreads();  // everyone has its Q fragments before sK is overwritten

  // Rows of this thread: r = q0 + warp*16 + g (+8).
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
  const int pos0 = pos_off + r0, pos1 = pos_off + r1;
  // A row with no allowed key attends to every key (attention_ref's build_mask).
  auto opened = [&](int pos) -> bool {
    if (!M) return false;
    return kCausal ? (pos < first_valid) : (first_valid >= Lk);
  };
  const bool open0 = opened(pos0), open1 = opened(pos1);
  const bool block_opened = M && (kCausal ? (pos_off + q0 < first_valid) : (first_valid >= Lk));

  int n_begin = 0, n_end = Lk;
  if (kCausal && !block_opened) n_end = min(Lk, pos_off + q0 + kBM);
  if (M && !block_opened) n_begin = (min(first_valid, Lk) / kBN) * kBN;  // tiles before it are all masked
  const int n_tiles = n_end > n_begin ? (n_end - n_begin + kBN - 1) / kBN : 0;

  float o[kND][4];
#pragma unroll
  for (int i = 0; i < kND; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  if (n_tiles > 0) {
    load_tile<T, D>(sK, K, p.k_sl, n_begin, min(kBN, Lk - n_begin));
    if (M && threadIdx.x < kBN) sMask[threadIdx.x] = (n_begin + threadIdx.x < Lk) ? M[n_begin + threadIdx.x] : 0;
    cp_async_commit();
    load_tile<T, D>(sV, V, p.v_sl, n_begin, min(kBN, Lk - n_begin));
    cp_async_commit();
  }

  for (int it = 0; it < n_tiles; it++) {
    const int n0 = n_begin + it * kBN;
    cp_async_wait<1>();  // K(it) landed (V(it) may still be in flight)
    __syncthreads();

    // S = Q Kᵀ (16 x 64 per warp)
    float s[kNB][4];
#pragma unroll
    for (int nb = 0; nb < kNB; nb++) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < kK16; ks += 2) {  // one ldmatrix.x4 = B fragments of two k16 steps
        uint32_t bf[4];
        ldsm_x4(bf, sK + (nb * 8 + (lane % 8)) * kRow + (ks + lane / 16) * 16 + ((lane / 8) % 2) * 8);
        MT::mma16816(s[nb], qf[ks], bf[0], bf[1]);
        MT::mma16816(s[nb], qf[ks + 1], bf[2], bf[3]);
      }
      if constexpr (kTail) {
        uint32_t b0;
        ldsm_x1(b0, sK + (nb * 8 + (lane % 8)) * kRow + kK16 * 16);
        MT::mma1688(s[nb], qt0, qt1, b0);
      }
    }
    // scale (log2 domain) and mask
    const bool need_mask = (M != nullptr) || (n0 + kBN > Lk) || (kCausal && n0 + kBN - 1 > pos_off + q0);
#pragma unroll
    for (int nb = 0; nb < kNB; nb++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float v = s[nb][e] * p.scale_log2;
        if (need_mask) {
          const int j = n0 + nb * 8 + 2 * t + (e & 1);
          const bool upper = e >= 2;
          const bool open = upper ? open1 : open0;
          const int pos = upper ? pos1 : pos0;
          bool ok = j < Lk;
          if (ok && !open) {
            if (kCausal && j > pos) ok = false;
            if (M && !sMask[j - n0]) ok = false;
          }
          if (!ok) v = -INFINITY;
        }
        s[nb][e] = v;
      }
    }
    __syncthreads();  // all warps done with sK / sMask of this tile
    if (it + 1 < n_tiles) {
      const int nn = n0 + kBN;
      load_tile<T, D>(sK, K, p.k_sl, nn, min(kBN, Lk - nn));
      if (M && threadIdx.x < kBN) sMask[threadIdx.x] = (nn + threadIdx.x < Lk) ? M[nn + threadIdx.x] : 0;
    }
    cp_async_commit();

    // online softmax (rows g and g+8 of the warp; a row's values live in the 4 lanes of a quad)
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < kNB; nb++) {
      mx0 = fmaxf(mx0, fmaxf(s[nb][0], s[nb][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nb][2], s[nb][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
    const float a0 = exp2f(m0 - mu0), a1 = exp2f(m1 - mu1);  // m = -inf -> 0
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int nb = 0; nb < kNB; nb++) {
      s[nb][0] = exp2f(s[nb][0] - mu0);
      s[nb][1] = exp2f(s[nb][1] - mu0);
      s[nb][2] = exp2f(s[nb][2] - mu1);
      s[nb][3] = exp2f(s[nb][3] - mu1);
      rs0 += s[nb][0] + s[nb][1];
      rs1 += s[nb][2] + s[nb][3];
    }
    l0 = l0 * a0 + rs0;
    l1 = l1 * a1 + rs1;
#pragma unroll
    for (int i = 0; i < kND; i++) {
      o[i][0] *= a0;
      o[i][1] *= a0;
      o[i][2] *= a1;
      o[i][3] *= a1;
    }

    cp_async_wait<1>();  // V(it) landed (K(it+1) may still be in flight)
    __syncthreads();
    // O += P V
#pragma unroll
    for (int kk = 0; kk < kBN / 16; kk++) {
      uint32_t a[4];
      a[0] = MT::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = MT::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = MT::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = MT::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd + 1 < kND; nd += 2) {  // one ldmatrix.x4.trans = B fragments of two n8 blocks
        uint32_t bf[4];
        ldsm_x4_trans(bf, sV + (kk * 16 + (lane % 16)) * kRow + (nd + lane / 16) * 8);
        MT::mma16816(o[nd], a, bf[0], bf[1]);
        MT::mma16816(o[nd + 1], a, bf[2], bf[3]);
      }
      if constexpr (kND % 2 == 1) {  // D = 72: the ninth n8 block
        uint32_t b0, b1;
        ldsm_x2_trans(b0, b1, sV + (kk * 16 + (lane % 16)) * kRow + (kND - 1) * 8);
        MT::mma16816(o[kND - 1], a, b0, b1);
      }
    }
    __syncthreads();  // all warps done with sV
    if (it + 1 < n_tiles) {
      const int nn = n0 + kBN;
      load_tile<T, D>(sV, V, p.v_sl, nn, min(kBN, Lk - nn));
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  // finish: row sums across the quad, normalize, store
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  T* O = static_cast<T*>(p.o) + b * p.o_sb + hq * p.o_sh;
#pragma unroll
  for (int nd = 0; nd < kND; nd++) {
    const int col = nd * 8 + 2 * t;
    if (r0 < Lq) *reinterpret_cast<uint32_t*>(O + r0 * p.o_sl + col) = MT::pack(o[nd][0] * inv0, o[nd][1] * inv0);
    if (r1 < Lq) *reinterpret_cast<uint32_t*>(O + r1 * p.o_sl + col) = MT::pack(o[nd][2] * inv1, o[nd][3] * inv1);
  }
}

template <typename T, int D, bool kCausal>
cudaError_t launch_fwd_typed(const AttnFwdParams& p, cudaStream_t stream) {
  dim3 grid((p.Lq + kBM - 1) / kBM, p.Hq, p.B);
  if (grid.x == 0 || p.Hq == 0 || p.B == 0) return cudaSuccess;
  attn_fwd_kernel<T, D, kCausal><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int D, bool kCausal>
cudaError_t launch_fwd_hd(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream) {
  return dtype == AttnDType::kBFloat16 ? launch_fwd_typed<__nv_bfloat16, D, kCausal>(p, stream)
                                       : launch_fwd_typed<__half, D, kCausal>(p, stream);
}

}  // namespace fwd

// Per-head-dim entry points (one translation unit each).
cudaError_t launch_attention_fwd_hd64(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);
cudaError_t launch_attention_fwd_hd72(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);
cudaError_t launch_attention_fwd_hd128(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace idefics3_kit
