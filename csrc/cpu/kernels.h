// CPU op implementations that other CPU ops call directly (no dispatcher round trip): the
// decode_layers op runs a whole one-token decoder step out of these.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace idefics3_kit {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& key_mask,
                                const std::optional<at::Tensor>& cache_seqlens, double scale);

at::Tensor decode_linear_cpu(const at::Tensor& x, at::TensorList weights,
                             const c10::List<std::optional<at::Tensor>>& biases);

at::Tensor quant_linear_cpu(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                            const c10::List<std::optional<at::Tensor>>& biases);

// decode_linear / quant_linear writing into y [..., sum of the weights' N] (contiguous bf16, x's
// rows), biases as pointers (null: none): what decode_layers calls with buffers it reuses for
// every layer, without a tensor allocation or a bias list per call.
void decode_linear_into(const at::Tensor& x, at::TensorList weights, c10::ArrayRef<const at::Tensor*> biases,
                        at::Tensor& y);

void quant_linear_into(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                       c10::ArrayRef<const at::Tensor*> biases, at::Tensor& y);

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace idefics3_kit
