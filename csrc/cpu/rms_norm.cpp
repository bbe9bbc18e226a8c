// rms_norm on CPU: rows of x [..., D] (float32 or bfloat16) normalized and scaled by weight [D].
// Kernel: csrc/include/idefics3_kit/rms_norm.h.
#include <cmath>

#include "common.h"
#include "idefics3_kit/rms_norm.h"
#include "kernels.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kRowsGrain = 64;  // rows per parallel chunk; a decode step's few rows run inline

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  check_dtype(weight, x.scalar_type(), op, "weight");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, op, ": weight must be [D] = [", d,
              "] (x's last dim), got ", shape_str(weight));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowsGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (x.scalar_type() == at::kFloat) {
        norm::row(xc.data_ptr<float>() + r * d, wc.data_ptr<float>(), d, e, out.data_ptr<float>() + r * d);
      } else {
        auto p = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
        norm::row(p(xc) + r * d, p(wc), d, e, p(out) + r * d);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace idefics3_kit
