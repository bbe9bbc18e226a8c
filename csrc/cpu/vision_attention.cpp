// vision_attention on CPU: non-causal attention with an optional key padding mask (SigLIP).
//
// Where the flash path takes the call (attention_flash.cpp: bf16, head dims that are multiples of 8
// up to 128, a CPU with AMX or AVX-512 BF16, finite keys and values) it runs there; everything else
// runs the blocked GEMM + softmax + GEMM kernel.
#include "attention_common.h"

namespace idefics3_kit {
namespace {

at::Tensor vision_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_mask, double scale) {
  check_qkv("vision_attention", q, k, v);
  check_key_mask("vision_attention", key_mask, q.size(0), k.size(2));
  if (flash_attention_applies(q, k, v, /*causal=*/false)) return flash_attention(q, k, v, key_mask, scale, /*causal=*/false);
  return blocked_attention("vision_attention", q, k, v, key_mask, scale, /*causal=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("vision_attention", &vision_attention_cpu); }

}  // namespace idefics3_kit
