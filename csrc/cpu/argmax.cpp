// argmax_last on CPU: x [..., V] (float32 or bfloat16) -> int64 [...], the index of each row's
// first maximum by torch.argmax's rule. Kernel: csrc/include/idefics3_kit/argmax.h.
#include <algorithm>

#include "common.h"
#include "idefics3_kit/argmax.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kEntriesPerChunk = 1 << 16;  // a decode step's few rows run inline

}  // namespace

at::Tensor argmax_last_cpu(const at::Tensor& x) {
  const char* op = "argmax_last";
  check_cpu(x, op, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const int64_t v = x.size(-1);
  TORCH_CHECK(v > 0, op, ": x's last dimension must not be empty (no maximum to point at), got shape ",
              shape_str(x));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  const int64_t rows = xc.numel() / v;
  int64_t* o = out.data_ptr<int64_t>();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, std::max<int64_t>(1, kEntriesPerChunk / v), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      o[r] = bf16 ? argmax::row(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) + r * v, v)
                  : argmax::row(xc.data_ptr<float>() + r * v, v);
  });
  return out;
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("argmax_last", &argmax_last_cpu); }

}  // namespace idefics3_kit
