// Small helpers shared by the CPU op wrappers (torch-dependent; kernels live in csrc/include).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <string>

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

}  // namespace idefics3_kit
