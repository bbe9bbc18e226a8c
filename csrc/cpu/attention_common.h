// Shared pieces of the CPU attention ops: argument checks, key-mask preparation and the
// blocked (GEMM + softmax + GEMM) kernel used by vision_attention and prefill_attention.
//
// Semantics (idefics3_kit/ops/attention.py, attention_ref): q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]
// with stride(-1) == 1 (any other strides); query head h reads key/value head h / (Hq / Hkv);
// with causal, query i sits at key position Lk - Lq + i; key_mask [B, Lk] bool, True = attend;
// a query row left with no key to attend to outputs 0 (the reference semantics).
// Rounding points match the reference: scores q·kᵀ in the input dtype, softmax in fp32,
// probabilities cast to the input dtype, then P·V in the input dtype.
#pragma once

#include <idefics3_kit/attention_math.h>

#include <optional>
#include <vector>

#include "common.h"

namespace idefics3_kit {

constexpr int64_t kMaxHeadDim = 512;

inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{q, "q"}, {k, "k"}, {v, "v"}}) {
    check_cpu(t, op, name);
    check_dim(t, 4, op, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                " must be float32 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.size(3) == 0 || t.stride(3) == 1, op, ": ", name, " must have stride(-1) == 1, got strides ",
                c10::str(t.strides()));
  }
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", shape_str(k), " and ",
              shape_str(v));
  TORCH_CHECK(q.size(0) == k.size(0), op, ": q and k must have the same batch, got ", q.size(0), " and ", k.size(0));
  const int64_t d = q.size(3);
  TORCH_CHECK(k.size(3) == d, op, ": k head dim must equal q head dim ", d, ", got ", k.size(3));
  TORCH_CHECK(d >= 8 && d % 8 == 0 && d <= kMaxHeadDim, op, ": head dim must be a multiple of 8 in [8, ",
              kMaxHeadDim, "], got ", d);
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(k.size(2) >= 1, op, ": k must hold at least one key, got shape ", shape_str(k));
}

inline void check_key_mask(const char* op, const std::optional<at::Tensor>& key_mask, int64_t b, int64_t lk) {
  if (!key_mask) return;
  const at::Tensor& m = *key_mask;
  check_cpu(m, op, "key_mask");
  check_dtype(m, at::kBool, op, "key_mask");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == b && m.size(1) == lk, op, ": key_mask must be [B, Lk] = [", b, ", ", lk,
              "], got ", shape_str(m));
  check_contiguous(m, op, "key_mask");
}

// Per batch row: the key mask as bits (attn::kept: 16 keys per word) and the first attendable key
// (Lk when none), used to find the rows that have nothing to attend to (they output 0).
struct KeyMaskInfo {
  std::vector<uint16_t> keep;        // [B, words], empty without a mask
  int64_t words = 0;                 // (Lk + 15) / 16
  std::vector<int64_t> first_valid;  // [B]
  const uint16_t* row(int64_t b) const { return keep.empty() ? nullptr : keep.data() + b * words; }
};

inline KeyMaskInfo key_mask_info(const std::optional<at::Tensor>& key_mask, int64_t b, int64_t lk) {
  KeyMaskInfo info;
  info.first_valid.assign(b, 0);
  if (!key_mask) return info;
  const bool* m = key_mask->data_ptr<bool>();
  info.words = (lk + 15) / 16;
  info.keep.assign(b * info.words, 0);
  for (int64_t i = 0; i < b; ++i) {
    int64_t first = lk;
    uint16_t* bits = info.keep.data() + i * info.words;
    for (int64_t j = 0; j < lk; ++j) {
      const bool keep = m[i * lk + j];
      bits[j >> 4] |= static_cast<uint16_t>(keep) << (j & 15);
      if (keep && first == lk) first = j;
    }
    info.first_valid[i] = first;
  }
  return info;
}

// Output allocated as [B, Lq, H, D] and returned as the [B, H, Lq, D] view, so that the callers'
// transpose(1, 2).reshape(B, Lq, H * D) needs no copy (the fake kernels say the same).
inline at::Tensor attention_output(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

at::Tensor blocked_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& key_mask, double scale, bool causal);

// The flash path (attention_flash.cpp: AMX, else AVX-512 BF16): whether it takes this checked call,
// and the call itself.
bool flash_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal);
at::Tensor flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& key_mask, double scale, bool causal);

}  // namespace idefics3_kit
