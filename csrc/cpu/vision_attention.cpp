// vision_attention on CPU: non-causal attention with an optional key padding mask (SigLIP).
#include "attention_common.h"

namespace idefics3_kit {
namespace {

at::Tensor vision_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_mask, double scale) {
  return blocked_attention("vision_attention", q, k, v, key_mask, scale, /*causal=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("vision_attention", &vision_attention_cpu); }

}  // namespace idefics3_kit
