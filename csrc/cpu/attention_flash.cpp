// The flash-attention path shared by vision_attention (non-causal) and prefill_attention (causal):
// bf16, a head dim the kernels take (multiples of 8 up to 128), finite keys and values, and a CPU
// with AMX (csrc/include/idefics3_kit/vision_amx.h) or else AVX-512 BF16
// (csrc/include/idefics3_kit/vision_avx512.h). One (batch, head) per work item. Everything else
// goes to the blocked kernel, whose NaN / inf rules are attention_ref's; a non-finite query makes
// its own row NaN in all of them.
#include <idefics3_kit/vision_amx.h>
#include <idefics3_kit/vision_avx512.h>

#include <atomic>
#include <functional>

#include "attention_common.h"

namespace idefics3_kit {

#ifdef IK_HAVE_FLASH_AVX512
namespace {

enum class FlashKernel { kNone, kAmx, kAvx512 };

// The tile unit where there is one, else the AVX-512 BF16 dot products.
FlashKernel flash_kernel(int64_t d) {
#ifdef IK_HAVE_AMX_PATH
  if (attn::vamx::usable(d)) return FlashKernel::kAmx;
#endif
  return attn::vavx::usable(d) ? FlashKernel::kAvx512 : FlashKernel::kNone;
}

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

// The heads of one thread's items on the kernel it picked (per-thread scratch, AMX tiles configured once).
template <FlashKernel K>
void run_items(int64_t i0, int64_t i1, const std::function<attn::flash::Head(int64_t)>& head_of) {
#ifdef IK_HAVE_AMX_PATH
  if constexpr (K == FlashKernel::kAmx) {
    attn::vamx::Scratch scratch;
    attn::vamx::configure();
    for (int64_t it = i0; it < i1; ++it) attn::vamx::run_head(head_of(it), scratch);
    attn::vamx::release();
    return;
  }
#endif
  if constexpr (K == FlashKernel::kAvx512) {
    attn::vavx::Scratch scratch;
    for (int64_t it = i0; it < i1; ++it) attn::vavx::run_head(head_of(it), scratch);
  }
}

}  // namespace

bool flash_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal) {
  // a non-finite query only spoils its own row, NaN in every kernel; keys and values reach every row
  return q.scalar_type() == at::kBFloat16 && flash_kernel(q.size(3)) != FlashKernel::kNone && q.size(2) > 0 &&
         (!causal || q.size(2) <= k.size(2)) && all_finite_bf16(k) && all_finite_bf16(v);
}

at::Tensor flash_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& key_mask, double scale, bool causal) {
  at::Tensor out = attention_output(q);
  const int64_t b = q.size(0), hq = q.size(1), lq = q.size(2), hkv = k.size(1), lk = k.size(2), d = q.size(3);
  const int64_t groups = hq / hkv;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto* mask = key_mask ? reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>()) : nullptr;
  const std::function<attn::flash::Head(int64_t)> head_of = [&](int64_t it) {
    const int64_t bi = it / hq, h = it % hq, hk = h / groups;
    return attn::flash::Head{qp + bi * q.stride(0) + h * q.stride(1), kp + bi * k.stride(0) + hk * k.stride(1),
                             vp + bi * v.stride(0) + hk * v.stride(1), op + bi * out.stride(0) + h * out.stride(1),
                             lq, lk, d, q.stride(2), k.stride(2), v.stride(2), out.stride(2),
                             mask ? mask + bi * lk : nullptr, static_cast<float>(scale), causal};
  };
  const FlashKernel kernel = flash_kernel(d);
  at::parallel_for(0, b * hq, 1, [&](int64_t i0, int64_t i1) {
    if (kernel == FlashKernel::kAmx)
      run_items<FlashKernel::kAmx>(i0, i1, head_of);
    else
      run_items<FlashKernel::kAvx512>(i0, i1, head_of);
  });
  return out;
}
#else
bool flash_attention_applies(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool) { return false; }

at::Tensor flash_attention(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool) {
  TORCH_CHECK(false, "flash_attention: this build has no AVX-512 flash-attention path");
}
#endif

}  // namespace idefics3_kit
