// prefill_attention on CPU: causal grouped-query attention, query i at key position
// Lk - Lq + i, with an optional key padding mask (left padding). Where the flash path takes the
// call (attention_flash.cpp: AMX, else AVX-512 BF16) it runs there, in its causal mode; everything
// else runs the blocked kernel.
#include "attention_common.h"

namespace idefics3_kit {
namespace {

at::Tensor prefill_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& key_mask, double scale) {
  check_qkv("prefill_attention", q, k, v);
  check_key_mask("prefill_attention", key_mask, q.size(0), k.size(2));
  if (flash_attention_applies(q, k, v, /*causal=*/true)) return flash_attention(q, k, v, key_mask, scale, /*causal=*/true);
  return blocked_attention("prefill_attention", q, k, v, key_mask, scale, /*causal=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("prefill_attention", &prefill_attention_cpu); }

}  // namespace idefics3_kit
