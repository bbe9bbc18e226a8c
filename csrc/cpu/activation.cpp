// gelu_tanh_ on CPU: x (float32 or bfloat16, contiguous) <- gelu_pytorch_tanh(x), in place.
// Kernel: csrc/include/idefics3_kit/activation.h.
#include "common.h"
#include "idefics3_kit/activation.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kEntriesPerChunk = 1 << 14;  // 64 KiB of float32 per parallel chunk

void gelu_tanh_cpu(at::Tensor& x) {
  const char* op = "gelu_tanh_";
  check_cpu(x, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  check_contiguous(x, op, "x");
  const int64_t n = x.numel();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, n, kEntriesPerChunk, [&](int64_t i0, int64_t i1) {
    if (bf16)
      act::gelu_tanh_inplace(reinterpret_cast<uint16_t*>(x.data_ptr<at::BFloat16>()) + i0, i1 - i0);
    else
      act::gelu_tanh_inplace(x.data_ptr<float>() + i0, i1 - i0);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("gelu_tanh_", &gelu_tanh_cpu); }

}  // namespace idefics3_kit
