// Attention kernels -- torch-free launch interface (plain CUDA C++).
//
// Layout: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], out [B, Hq, Lq, D], arbitrary strides in
// elements with stride(-1) == 1, base pointers 16-byte aligned and the other strides multiples
// of 8 (the binding makes a contiguous copy otherwise). Query head h reads key/value head
// h / (Hq / Hkv). key_mask: bool/uint8 [B, Lk] (row stride mask_stride_b), nonzero = attend.
// Semantics are those of idefics3_kit.ops.attention.attention_ref: causal query i sits at key
// position Lk - Lq + i; a row with no allowed key attends to every key (build_mask opens it up).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace idefics3_kit {
namespace cuda {

enum class AttnDType : int32_t { kBFloat16 = 0, kFloat16 = 1 };

struct AttnFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const uint8_t* key_mask;  // nullable
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t o_sb, o_sh, o_sl;
  int64_t mask_sb;
  int32_t B, Hq, Hkv, Lq, Lk, D;
  float scale_log2;  // softmax scale * log2(e)
  int32_t causal;
};

// Vision (non-causal) and prefill (causal) forward: mma.sync tensor cores, online softmax,
// fp32 accumulation. D in {64, 72, 128} (72 without padding: 4 k16 steps + one m16n8k8).
// Causal is supported for D 64 and 128.
cudaError_t launch_attention_fwd(const AttnFwdParams& p, AttnDType dtype, cudaStream_t stream);
bool attention_fwd_supported(int head_dim, bool causal);

struct AttnDecodeParams {
  const void* q;  // [B, Hq, 1, D]
  const void* k;  // [B, Hkv, Lk, D] (views of the static cache)
  const void* v;
  void* o;                      // [B, Hq, 1, D]
  const uint8_t* key_mask;      // nullable [B, Lk]
  const int32_t* cache_seqlens; // nullable [B]: keys j >= cache_seqlens[b] are not attended
  float* partial_o;             // [B, Hq, num_splits, D] fp32 workspace (num_splits > 1)
  float* partial_lse;           // [B, Hq, num_splits] fp32 workspace (log2 domain)
  int64_t q_sb, q_sh;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int64_t o_sb, o_sh;
  int64_t mask_sb;
  int32_t B, Hq, Hkv, Lk, D;
  int32_t num_splits;
  float scale_log2;
};

// Split-KV decode: one CTA per (batch, kv head, split, chunk of <= 8 query heads of the group),
// the query heads of a group processed together (K/V read once per group), then an LSE combine
// kernel when num_splits > 1. No host synchronisation: cache_seqlens is only read on the device,
// so the launch is CUDA-graph safe. D in {64, 128}.
cudaError_t launch_attention_decode(const AttnDecodeParams& p, AttnDType dtype, cudaStream_t stream);
bool attention_decode_supported(int head_dim);
// Split count from shapes only (host ints; no device reads).
int attention_decode_num_splits(int B, int Hq, int Hkv, int Lk, int num_sms);

}  // namespace cuda
}  // namespace idefics3_kit
