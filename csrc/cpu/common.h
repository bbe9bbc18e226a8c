// Small helpers shared by the CPU op wrappers (torch-dependent; kernels live in csrc/include).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// The resize kernels' parallel_for(begin, end, fn) signature on top of at::parallel_for.
struct AtParallel {
  template <typename F>
  void operator()(int64_t begin, int64_t end, F&& fn) const {
    at::parallel_for(begin, end, 1, fn);
  }
};

}  // namespace idefics3_kit
