// The AMX flash-attention path shared by vision_attention (non-causal) and prefill_attention
// (causal): bf16, a head dim the kernel takes (multiples of 8 up to 128), a CPU with AMX, finite
// keys and values (csrc/include/idefics3_kit/vision_amx.h). One (batch, head) per work item.
// Everything else goes to the blocked kernel, whose NaN / inf rules are attention_ref's; a
// non-finite query makes its own row NaN in both.
#include <idefics3_kit/vision_amx.h>

#include <atomic>

#include "attention_common.h"

namespace idefics3_kit {

#ifdef IK_HAVE_AMX_PATH
namespace {

// Whether every row of t [B, H, L, D] (stride(3) == 1) is finite; bf16 only.
bool all_finite_bf16(const at::Tensor& t) {
  const int64_t b = t.size(0), h = t.size(1), l = t.size(2), d = t.size(3);
  const auto* base = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  std::atomic<bool> bad{false};
  at::parallel_for(0, b * h, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1 && !bad.load(std::memory_order_relaxed); ++r) {
      const uint16_t* head = base + (r / h) * t.stride(0) + (r % h) * t.stride(1);
      for (int64_t i = 0; i < l; ++i)
        if (attn::any_nonfinite(head + i * t.stride(2), d)) {
          bad = true;
          break;
        }
    }
  });
  return !bad;
}

}  // namespace

bool amx_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  // a non-finite query only spoils its own row, NaN in both kernels; keys and values reach every row
  return q.scalar_type() == at::kBFloat16 && attn::vamx::usable(q.size(3)) && q.size(2) > 0 &&
         (!causal || q.size(2) <= k.size(2)) && all_finite_bf16(k) && all_finite_bf16(v);
}

at::Tensor amx_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_mask, double scale, bool causal) {
  at::Tensor out = attention_output(q);
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), hkv = k.size(1), lk = k.size(2), d = q.size(3);
  const int64_t groups = hq / hkv;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto* mask = key_mask ? reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>()) : nullptr;
  at::parallel_for(0, b * hq, 1, [&](int64_t i0, int64_t i1) {
    attn::vamx::Scratch scratch;
    attn::vamx::configure();
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t bi = it / hq, h = it % hq, hk = h / groups;
      const attn::vamx::Head head{qp + bi * q.stride(0) + h * q.stride(1), kp + bi * k.stride(0) + hk * k.stride(1),
                                  vp + bi * v.stride(0) + hk * v.stride(1), op + bi * out.stride(0) + h * out.stride(1),
                                  lq, lk, d, q.stride(2), k.stride(2), v.stride(2), out.stride(2),
                                  mask ? mask + bi * lk : nullptr, static_cast<float>(scale), causal};
      attn::vamx::run_head(head, scratch);
    }
    attn::vamx::release();
  });
  return out;
}
#else
bool amx_attention_applies(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) { return false; }

at::Tensor amx_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         double, bool) {
  TORCH_CHECK(false, "amx_attention: this build has no AMX path");
}
#endif

}  // namespace idefics3_kit
