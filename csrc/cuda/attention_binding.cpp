// CUDA implementations of idefics3_kit::{vision,prefill,decode}_attention (schemas in
// csrc/ops.cpp). Thin: checks, layout fix-ups, allocation through the caching allocator, launch
// on the current stream. No host synchronisation and no device reads (CUDA-graph safe).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention.cuh"

namespace idefics3_kit {
namespace cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// 16-byte aligned base, stride(-1) == 1 and the other strides multiples of 8 elements; else a
// contiguous copy (the kernels read rows with 16-byte vector loads).
at::Tensor aligned(const at::Tensor& t) {
  auto stride_ok = [&](int d) { return t.size(d) == 1 || t.stride(d) % 8 == 0; };  // size-1 dims: any stride
  const bool ok = t.stride(3) == 1 && stride_ok(0) && stride_ok(1) && stride_ok(2) &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : t.contiguous();
}

AttnDType attn_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              " (CUDA): q/k/v must be bfloat16 or float16, got ", q.scalar_type());
  return q.scalar_type() == at::kBFloat16 ? AttnDType::kBFloat16 : AttnDType::kFloat16;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && v.device() == q.device(), op,
              " (CUDA): q, k, v must be on the same CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, " (CUDA): q/k/v must be [B, H, L, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              " (CUDA): q, k, v must have one dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), op, " (CUDA): k ", k.sizes(), " and v ", v.sizes(), " differ");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, " (CUDA): k/v ", k.sizes(),
              " do not match q ", q.sizes(), " in batch and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, " (CUDA): ", q.size(1),
              " query heads are not a multiple of ", k.size(1), " key/value heads");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, " (CUDA): stride(-1) must be 1");
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op, " (CUDA): batch and heads must be <= 65535");
  TORCH_CHECK(k.size(2) < std::numeric_limits<int32_t>::max() && q.size(2) < std::numeric_limits<int32_t>::max(),
              op, " (CUDA): sequence too long");
}

// bool/uint8 [B, Lk] on q's device, contiguous rows; nullptr when absent.
at::Tensor key_mask_bytes(const c10::optional<at::Tensor>& key_mask, const at::Tensor& q, int64_t lk, const char* op) {
  if (!key_mask.has_value() || !key_mask->defined()) return at::Tensor();
  const at::Tensor& m = *key_mask;
  TORCH_CHECK(m.device() == q.device(), op, " (CUDA): key_mask must be on ", q.device());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == lk, op, " (CUDA): key_mask must be [B, Lk] = [",
              q.size(0), ", ", lk, "], got ", m.sizes());
  at::Tensor mb = m.scalar_type() == at::kBool || m.scalar_type() == at::kByte ? m : m.ne(0);
  if (mb.stride(1) != 1) mb = mb.contiguous();
  return mb;
}

at::Tensor fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
               const c10::optional<at::Tensor>& key_mask, double scale, bool causal, const char* op) {
  check_qkv(q_in, k_in, v_in, op);
  const AttnDType dt = attn_dtype(q_in, op);
  const int64_t D = q_in.size(3);
  TORCH_CHECK(attention_fwd_supported(static_cast<int>(D), causal), op, " (CUDA): head dim ", D,
              causal ? " is not supported (causal: 64, 128)" : " is not supported (64, 72, 128)");
  if (causal) {
    TORCH_CHECK(q_in.size(2) <= k_in.size(2), op, " (CUDA): more queries (", q_in.size(2), ") than keys (",
                k_in.size(2), ")");
  }
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const at::Tensor mask = key_mask_bytes(key_mask, q, k.size(2), op);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  TORCH_CHECK(k.size(2) > 0, op, " (CUDA): no keys");
  AttnFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.key_mask = mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sl = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sl = v.stride(2);
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
  p.mask_sb = mask.defined() ? mask.stride(0) : 0;
  p.B = static_cast<int32_t>(q.size(0));
  p.Hq = static_cast<int32_t>(q.size(1));
  p.Hkv = static_cast<int32_t>(k.size(1));
  p.Lq = static_cast<int32_t>(q.size(2));
  p.Lk = static_cast<int32_t>(k.size(2));
  p.D = static_cast<int32_t>(D);
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  p.causal = causal ? 1 : 0;
  C10_CUDA_CHECK(launch_attention_fwd(p, dt, at::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return out;
}

at::Tensor vision_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_mask, double scale) {
  return fwd(q, k, v, key_mask, scale, /*causal=*/false, "vision_attention");
}

at::Tensor prefill_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& key_mask, double scale) {
  return fwd(q, k, v, key_mask, scale, /*causal=*/true, "prefill_attention");
}

at::Tensor decode_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const c10::optional<at::Tensor>& key_mask,
                                 const c10::optional<at::Tensor>& cache_seqlens, double scale) {
  const char* op = "decode_attention";
  check_qkv(q_in, k_in, v_in, op);
  const AttnDType dt = attn_dtype(q_in, op);
  TORCH_CHECK(q_in.size(2) == 1, op, " (CUDA): one query per sequence, got Lq = ", q_in.size(2));
  const int64_t D = q_in.size(3);
  TORCH_CHECK(attention_decode_supported(static_cast<int>(D)), op, " (CUDA): head dim ", D,
              " is not supported (64, 128)");
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in);
  const at::Tensor mask = key_mask_bytes(key_mask, q, k.size(2), op);
  at::Tensor seqlens;
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    seqlens = *cache_seqlens;
    TORCH_CHECK(seqlens.device() == q.device() && seqlens.dim() == 1 && seqlens.size(0) == q.size(0), op,
                " (CUDA): cache_seqlens must be [B] on ", q.device());
    TORCH_CHECK(seqlens.scalar_type() == at::kInt, op, " (CUDA): cache_seqlens must be int32");
    seqlens = seqlens.contiguous();
  }
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int B = static_cast<int>(q.size(0)), Hq = static_cast<int>(q.size(1)), Hkv = static_cast<int>(k.size(1));
  const int Lk = static_cast<int>(k.size(2));
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int splits = attention_decode_num_splits(B, Hq, Hkv, Lk, sms);
  at::Tensor part_o, part_lse;
  if (splits > 1) {
    part_o = at::empty({B, Hq, splits, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({B, Hq, splits}, q.options().dtype(at::kFloat));
  }
  AttnDecodeParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = out.data_ptr();
  p.key_mask = mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  p.cache_seqlens = seqlens.defined() ? seqlens.data_ptr<int32_t>() : nullptr;
  p.partial_o = splits > 1 ? part_o.data_ptr<float>() : nullptr;
  p.partial_lse = splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  p.q_sb = q.stride(0); p.q_sh = q.stride(1);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sl = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sl = v.stride(2);
  p.o_sb = out.stride(0); p.o_sh = out.stride(1);
  p.mask_sb = mask.defined() ? mask.stride(0) : 0;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.Lk = Lk;
  p.D = static_cast<int32_t>(D);
  p.num_splits = splits;
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  C10_CUDA_CHECK(launch_attention_decode(p, dt, at::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CUDA, m) {
  m.impl("vision_attention", &vision_attention_cuda);
  m.impl("prefill_attention", &prefill_attention_cuda);
  m.impl("decode_attention", &decode_attention_cuda);
}

}  // namespace cuda
}  // namespace idefics3_kit
