// Small helpers shared by the CPU op wrappers (torch-dependent; kernels live in csrc/include).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <idefics3_kit/step_team.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

namespace idefics3_kit {

// "[2, 3, 4]" for error messages.
inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

// Argument checks shared by every op: name the argument, say what was expected and what came.
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D with shape ", shape_str(t));
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", c10::str(t.strides()));
}

// Runs body(worker_state, item) for item in [0, items) on at::get_num_threads() workers that
// take items from a shared counter. Unlike at::parallel_for's fixed ranges, a thread that the
// OS deschedules (a busy machine) delays the op by one item, not by half of the work.
// Workers run under the caller's thread-local state (inference mode, grad mode, dispatch keys):
// OpenMP threads do not inherit it, and ATen ops on inference tensors (torch.inference_mode)
// would otherwise fail in them.
template <typename State, typename Body>
void parallel_items(int64_t items, Body&& body, int64_t max_workers = INT64_MAX) {
  if (items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), items, max_workers}));
  const at::ThreadLocalState caller;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard tls(caller);
    State state;
    for (int64_t it = next.fetch_add(1); it < items; it = next.fetch_add(1)) body(state, it);
  });
}

// The resize kernels' parallel_for(begin, end, fn) signature: the range is cut into about 8
// chunks per thread that the workers take dynamically (see parallel_items).
struct AtParallel {
  template <typename F>
  void operator()(int64_t begin, int64_t end, F&& fn) const {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t chunk = std::max<int64_t>(1, n / (8 * at::get_num_threads()));
    const int64_t chunks = (n + chunk - 1) / chunk;
    struct None {};
    parallel_items<None>(chunks, [&](None&, int64_t c) {
      fn(begin + c * chunk, std::min(end, begin + (c + 1) * chunk));
    });
  }
};

// Bias i of a few-row linear with N outputs: null, or [N] bfloat16 / float32; returned as a
// contiguous float32 tensor (undefined when absent), the form the GEMV kernels add.
inline at::Tensor bias_as_float(const at::Tensor* b, size_t i, int64_t n, const char* op) {
  if (b == nullptr || !b->defined()) return at::Tensor();
  const std::string name = "biases[" + std::to_string(i) + "]";
  check_cpu(*b, op, name.c_str());
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", name, " must be [N] = [", n, "], got ", shape_str(*b));
  TORCH_CHECK(b->scalar_type() == at::kBFloat16 || b->scalar_type() == at::kFloat, op, ": ", name,
              " must be bfloat16 or float32, got ", b->scalar_type());
  return b->to(at::kFloat).contiguous();
}

// The entries of an op's bias list as pointers (null for None), the form the *_into cores take.
inline std::vector<const at::Tensor*> bias_pointers(const c10::List<std::optional<at::Tensor>>& biases,
                                                    std::vector<std::optional<at::Tensor>>& owned) {
  owned = biases.vec();
  std::vector<const at::Tensor*> out;
  for (const auto& b : owned) out.push_back(b.has_value() && b->defined() ? &*b : nullptr);
  return out;
}

// The output a few-row linear allocates for x [..., K]: [..., sum of the weights' rows], x's dtype.
inline at::Tensor linear_output(const at::Tensor& x, at::TensorList weights, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  int64_t n_total = 0;
  for (const at::Tensor& w : weights) n_total += w.dim() >= 1 ? w.size(0) : 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n_total;
  return at::empty(out_shape, x.options());
}

// A few-row linear's output buffer y [..., N]: contiguous, bf16, on the CPU (the *_into cores
// write it through a raw pointer).
inline void check_output(const at::Tensor& y, int64_t rows, int64_t n, const char* op) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kBFloat16 && y.is_contiguous() && y.dim() >= 1 &&
                  y.size(-1) == n && y.numel() == rows * n,
              op, ": out must be a contiguous CPU bfloat16 tensor [..., ", n, "] with ", rows, " rows, got ",
              y.scalar_type(), " ", shape_str(y));
}

// Runs body(w) for each worker w in [0, workers), each on its own thread where there are enough:
// through the decode step's team when this thread leads one (step_team.h: no region of its own),
// else in one at::parallel_for region. body must not call ATen ops (the team's threads run
// without torch's thread-local state).
template <typename Body>
inline void for_workers(int64_t workers, Body&& body) {
  if (workers <= 1) {
    if (workers == 1) body(0);
    return;
  }
  if (StepTeam::run(workers, body)) return;
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) body(w);
  });
}

// The work split of the few-row GEMVs: the weights' output rows, concatenated into [0, n_total)
// (weight i starts at first_row[i] and has rows[i] rows), cut into one contiguous range per
// worker (a multiple of 4 rows), so each core streams its part of the weights front to back,
// which the prefetchers follow best (measured: 55 GB/s on 2 cores vs ~32 GB/s with small,
// dynamically shared pieces). Each range is run as kRowChunksPerWorker chunks in order, and a
// worker done with its own takes the chunks of a late one that nobody started (ChunkClaims,
// step_team.h). Workers: one per ``min_bytes_per_worker`` of weights read, at most the thread
// count. ``run(i, lo, hi)`` computes rows [lo, hi) of weight i.
constexpr int64_t kRowChunksPerWorker = 4;  // int4 steps on a Zen 3: 2 chunks ~4% slower than 4, 8 chunks 0-3%

template <typename Run>
inline void for_worker_row_ranges(c10::ArrayRef<int64_t> first_row, c10::ArrayRef<int64_t> rows,
                                  int64_t n_total, int64_t bytes, int64_t min_bytes_per_worker, Run&& run) {
  const int64_t workers = std::clamp<int64_t>(bytes / min_bytes_per_worker, 1, at::get_num_threads());
  const int64_t per_worker = ((n_total + workers - 1) / workers + 3) / 4 * 4;
  auto run_range = [&](int64_t lo, int64_t hi) {
    for (size_t i = 0; i < first_row.size(); ++i) {
      const int64_t a = std::max(lo, first_row[i]), b = std::min(hi, first_row[i] + rows[i]);
      if (a < b) run(i, a - first_row[i], b - first_row[i]);
    }
  };
  if (workers <= 1) {
    run_range(0, n_total);
    return;
  }
  // each worker's range in kRowChunksPerWorker chunks (multiples of 4 rows), claimed at run time
  // (step_team.h's ChunkClaims says why)
  const int64_t per_chunk = ((per_worker + kRowChunksPerWorker - 1) / kRowChunksPerWorker + 3) / 4 * 4;
  ChunkClaims claims(workers, kRowChunksPerWorker);
  for_workers(workers, [&](int64_t t) {
    claims.run(t, [&](int64_t u, int64_t c) {
      const int64_t lo = u * per_worker + c * per_chunk;
      const int64_t hi = std::min({n_total, (u + 1) * per_worker, lo + per_chunk});
      if (lo < hi) run_range(lo, hi);
    });
  });
}

}  // namespace idefics3_kit
