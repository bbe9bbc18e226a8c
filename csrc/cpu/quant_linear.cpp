// quant_linear on CPU: a linear over a few bf16 rows (decode steps) against int8 / int4
// weight-only quantized weights, several weights' outputs side by side (q|k|v, gate|up).
// Kernel: csrc/include/idefics3_kit/gemv_quant.h; format and reference: idefics3_kit/ops/quant.py.
#include <vector>

#include <c10/util/SmallVector.h>

#include "common.h"
#include "idefics3_kit/gemv_quant.h"
#include "kernels.h"

namespace idefics3_kit {
namespace {

// Weight bytes per worker at least: below this a second thread costs more than it saves. 96 KiB
// left an int4 o_proj at SmolVLM-256M shapes (576 x 576, 166 KiB) on one thread; with 32 KiB, on a
// Zen 4, with the weights out of the caches as in a decode step, its call took 12.9-13.5 instead
// of 15.8 us and an int8 k_proj's (192 x 576) 9.5 instead of 11.1 (medians of 8, interleaved).
constexpr int64_t kMinBytesPerWorker = 32 * 1024;

}  // namespace

// bits of one weight, after checking it against x's K and its scales.
int check_quant_weight(const at::Tensor& w, const at::Tensor& s, int64_t k, size_t i, const char* op) {
  const bool plain = w.device().is_cpu() && s.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                     s.is_contiguous() && s.scalar_type() == at::kBFloat16;
  if (!plain) {  // the names are built only to report a problem (this runs ~120 times per decode step)
    const std::string name = "qweights[" + std::to_string(i) + "]", sname = "scales[" + std::to_string(i) + "]";
    check_cpu(w, op, name.c_str());
    check_cpu(s, op, sname.c_str());
    check_dim(w, 2, op, name.c_str());
    check_contiguous(w, op, name.c_str());
    check_contiguous(s, op, sname.c_str());
    check_dtype(s, at::kBFloat16, op, sname.c_str());
  }
  if (w.scalar_type() == at::kChar) {
    TORCH_CHECK(w.size(1) == k, op, ": qweights[", i, "] (int8) must be [N, K] with K = ", k, ", got ", shape_str(w));
    TORCH_CHECK(s.dim() == 1 && s.size(0) == w.size(0), op, ": scales[", i, "] must be [N] = [", w.size(0), "] for int8, got ",
                shape_str(s));
    return 8;
  }
  TORCH_CHECK(w.scalar_type() == at::kByte, op, ": qweights[", i, "] must be int8 (8 bits) or uint8 (packed 4 bits), got ",
              w.scalar_type());
  TORCH_CHECK(2 * w.size(1) == k, op, ": qweights[", i, "] (packed int4) must be [N, K/2] with K = ", k, ", got ", shape_str(w));
  const int64_t group = s.dim() == 2 && s.size(1) > 0 && k % s.size(1) == 0 ? k / s.size(1) : 0;
  TORCH_CHECK(s.dim() == 2 && s.size(0) == w.size(0) && (group == 32 || group == 64 || group == 128), op, ": scales[", i,
              "] must be [N, K/g] with N = ", w.size(0), " and a group size g of 32, 64 or 128 dividing K = ", k, ", got ",
              shape_str(s));
  return 4;
}

namespace {

// The activation buffers of one call (qgemv::prepare fills every element it is given), kept per
// thread and grown as needed, instead of seven fresh zero-filled vectors per call (~120 calls a
// step): malloc and free were 15% of an int4 decode step's non-GEMV time before these buffers and
// decode_layers' reused ones, 8% after (perf).
struct ActScratch {
  std::vector<int8_t> xq, xeo;
  std::vector<int32_t> init8, init4;
  std::vector<float> xs, xs8, xs4;
};

template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace

QuantWeight quant_weight_unchecked(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int bits,
                                   const float* bias) {
  return {static_cast<const uint8_t*>(qweight.data_ptr()), bits, bits == 4 ? k / scales.size(1) : 0,
          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()), bias, qweight.size(0)};
}

QuantWeight quant_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, size_t index,
                         const float* bias) {
  return quant_weight_unchecked(qweight, scales, k, check_quant_weight(qweight, scales, k, index), bias);
}

void quant_linear_run(const uint16_t* x, int64_t rows_x, int64_t k, c10::ArrayRef<QuantWeight> weights, uint16_t* y) {
  c10::SmallVector<qgemv::Job, 4> jobs;
  c10::SmallVector<int64_t, 4> first_row, rows;
  int64_t n_total = 0, bytes = 0;
  for (const QuantWeight& w : weights) {
    jobs.push_back({w.w, w.bits, w.group, w.scales, w.bias, nullptr, 0});
    first_row.push_back(n_total);
    rows.push_back(w.rows);
    bytes += w.rows * (w.bits == 8 ? k : k / 2);
    n_total += w.rows;
  }
  if (rows_x == 0 || n_total == 0) return;
  for (size_t i = 0; i < jobs.size(); ++i) {
    jobs[i].y = y + first_row[i];
    jobs[i].y_stride = n_total;
  }
  // x quantized once per call (a fixed cost per call, shared by every weight of it), in the forms
  // this call's weights use
  const bool any8 = std::any_of(jobs.begin(), jobs.end(), [](const qgemv::Job& j) { return j.bits == 8; });
  const bool any4 = std::any_of(jobs.begin(), jobs.end(), [](const qgemv::Job& j) { return j.bits == 4; });
  const qgemv::ActSizes n = qgemv::act_sizes(rows_x, k);
  thread_local ActScratch buf;
  int8_t* xq = sized(buf.xq, n.xq);
  float* xs = sized(buf.xs, n.xs);
  int8_t* xeo = any4 ? sized(buf.xeo, n.xeo) : nullptr;
  int32_t* init8 = any8 ? sized(buf.init8, n.init8) : nullptr;
  int32_t* init4 = any4 ? sized(buf.init4, n.init4) : nullptr;
  float* xs8 = any8 ? sized(buf.xs8, n.xs8) : nullptr;
  float* xs4 = any4 ? sized(buf.xs4, n.xs4) : nullptr;
  qgemv::prepare(x, rows_x, k, k, xq, xs, xeo, init8, init4, xs8, xs4);
  const qgemv::Act act{rows_x, k, qgemv::padded_k(k), xq, xs, xeo, init8, init4, xs8, xs4};
  // the work split decode_linear uses (common.h)
  for_worker_row_ranges(first_row, rows, n_total, bytes, kMinBytesPerWorker,
                        [&](size_t i, int64_t lo, int64_t hi) { qgemv::run_rows(act, jobs[i], lo, hi); });
}

void quant_linear_into(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                       c10::ArrayRef<const at::Tensor*> biases, at::Tensor& y) {
  const char* op = "quant_linear";
  check_cpu(x, op, "x");
  check_dtype(x, at::kBFloat16, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(!qweights.empty(), op, ": qweights must hold at least one weight");
  TORCH_CHECK(scales.size() == qweights.size() && biases.size() == qweights.size(), op,
              ": scales and biases must have one entry per weight: ", qweights.size(), " weights, ", scales.size(),
              " scales, ", biases.size(), " biases");
  const int64_t k = x.size(-1);
  TORCH_CHECK(k > 0, op, ": x's last dimension (K) must be positive, got shape ", shape_str(x));
  const at::Tensor xc = x.contiguous();
  const int64_t rows_x = xc.numel() / k;
  std::vector<at::Tensor> bias_f(qweights.size());
  std::vector<QuantWeight> weights;
  int64_t n_total = 0;
  for (size_t i = 0; i < qweights.size(); ++i) {
    QuantWeight w = quant_weight(qweights[i], scales[i], k, i, nullptr);
    bias_f[i] = bias_as_float(biases[i], i, w.rows, op);
    w.bias = bias_f[i].defined() ? bias_f[i].data_ptr<float>() : nullptr;
    weights.push_back(w);
    n_total += w.rows;
  }
  check_output(y, rows_x, n_total, op);
  quant_linear_run(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), rows_x, k, weights,
                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
}

at::Tensor quant_linear_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                            const c10::List<std::optional<at::Tensor>>& biases) {
  at::Tensor y = linear_output(x, qweights, "quant_linear");
  std::vector<std::optional<at::Tensor>> owned;
  quant_linear_into(x, qweights, scales, bias_pointers(biases, owned), y);
  return y;
}

// The weight [N, K] in bf16 (q * s rounded once, as ops.quant.dequantize): the prefill (many rows)
// then runs the ordinary bf16 matmul. Rows split over the threads.
at::Tensor quant_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.dim() == 2, "quant_dequantize: qweight must be 2-D, got ", shape_str(qweight));
  const int64_t n = qweight.size(0), k = qweight.scalar_type() == at::kByte ? 2 * qweight.size(1) : qweight.size(1);
  const int bits = check_quant_weight(qweight, scales, k, 0, "quant_dequantize");
  at::Tensor out = at::empty({n, k}, scales.options());
  const qgemv::Job job{static_cast<const uint8_t*>(qweight.data_ptr()), bits, bits == 4 ? k / scales.size(1) : 0,
                       reinterpret_cast<const uint16_t*>(scales.data_ptr<at::BFloat16>()), nullptr, nullptr, 0};
  auto* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / k), [&](int64_t r0, int64_t r1) {
    qgemv::run_dequant(job, k, o, r0, r1);
  });
  return out;
}

TORCH_LIBRARY_IMPL(idefics3_kit, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_dequantize", &quant_dequantize_cpu);
}

}  // namespace idefics3_kit
