// decode_linear on CPU: a bf16 linear over a few rows (decode steps), with the outputs of
// several weights (q|k|v, gate|up) written side by side into one tensor. Kernel:
// csrc/include/idefics3_kit/gemv_bf16.h.
#include <vector>

#include "common.h"
#include "idefics3_kit/gemv_amx.h"
#include "idefics3_kit/gemv_bf16.h"
#include "kernels.h"

namespace idefics3_kit {
namespace {

constexpr int64_t kMinBytesPerWorker = 192 * 1024;  // below this a second thread costs more than it saves

}  // namespace

void decode_linear_into(const at::Tensor& x, at::TensorList weights, c10::ArrayRef<const at::Tensor*> biases,
                        at::Tensor& y) {
  const char* op = "decode_linear";
  check_cpu(x, op, "x");
  check_dtype(x, at::kBFloat16, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one [N, K] tensor");
  TORCH_CHECK(biases.size() == weights.size(), op, ": biases must have one entry (a tensor or None) per weight: ",
              weights.size(), " weights, ", biases.size(), " biases");
  const int64_t k = x.size(-1);
  TORCH_CHECK(k > 0, op, ": x's last dimension (K) must be positive, got shape ", shape_str(x));
  const at::Tensor xc = x.contiguous();
  const int64_t rows_x = xc.numel() / k;

  int64_t n_total = 0;
  std::vector<at::Tensor> bias_f(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    if (!(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous())) {
      const std::string name = "weights[" + std::to_string(i) + "]";  // built only to report a problem
      check_cpu(w, op, name.c_str());
      check_dtype(w, at::kBFloat16, op, name.c_str());
      check_dim(w, 2, op, name.c_str());
      check_contiguous(w, op, name.c_str());
    }
    TORCH_CHECK(w.size(1) == k, op, ": weights[", i, "] must be [N, K] with K = ", k, " (x's last dim), got ",
                shape_str(w));
    bias_f[i] = bias_as_float(biases[i], i, w.size(0), op);
    n_total += w.size(0);
  }
  check_output(y, rows_x, n_total, op);
  if (rows_x == 0 || n_total == 0) return;

  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  std::vector<gemv::Job> jobs;
  std::vector<int64_t> first_row;  // of each weight in the concatenated row space [0, n_total)
  std::vector<int64_t> rows;       // of each weight
  int64_t offset = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    jobs.push_back({xp, rows_x, k, k, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
                    bias_f[i].defined() ? bias_f[i].data_ptr<float>() : nullptr, yp + offset, n_total});
    first_row.push_back(offset);
    rows.push_back(w.size(0));
    offset += w.size(0);
  }
#ifdef IK_HAVE_AMX_PATH
  if (gemv::amx::usable(rows_x, k)) {  // 4-16 rows: the tile unit (gemv_amx.h), x packed once for all workers
    std::vector<uint16_t> xb;
    gemv::amx::pack_x(xp, rows_x, k, k, xb);
    for_worker_row_ranges(first_row, rows, n_total, n_total * k * 2, kMinBytesPerWorker,
                          [&](size_t i, int64_t lo, int64_t hi) { gemv::amx::rows_packed(jobs[i], xb.data(), lo, hi); });
    return;
  }
#endif
  for_worker_row_ranges(first_row, rows, n_total, n_total * k * 2, kMinBytesPerWorker,
                        [&](size_t i, int64_t lo, int64_t hi) { gemv::run_rows(jobs[i], lo, hi); });
}

at::Tensor decode_linear_cpu(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases) {
  at::Tensor y = linear_output(x, weights, "decode_linear");
  std::vector<std::optional<at::Tensor>> owned;
  decode_linear_into(x, weights, bias_pointers(biases, owned), y);
  return y;
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) { m.impl("decode_linear", &decode_linear_cpu); }

}  // namespace idefics3_kit
