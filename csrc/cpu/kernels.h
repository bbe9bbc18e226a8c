// CPU op implementations that other CPU ops call directly (no dispatcher round trip): the
// decode_layers op runs a whole one-token decoder step out of these.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace idefics3_kit {

// decode_attention after its checks, on raw pointers (what decode_layers calls with its own
// buffers: no view, output or argument tensors per layer). Strides are in elements. q [B, H, 1, D]
// at (q_s0, q_s1) with stride 1 on D; k, v [B, Hkv, L, D] at (s0, s1, s2); key_mask: rows of L
// bools mask_s0 apart, or null; seqlens: int32 [B] (each in [0, L]) or null; out [B, H, D] at
// (o_s0, o_s1), written whole (0 for a row with no key to attend to).
struct DecodeAttention {
  int64_t b, hq, hkv, l, d;
  bool bf16;  // else float32 (q, k, v and out alike)
  const void* q;
  int64_t q_s0, q_s1;
  const void* k;
  int64_t k_s0, k_s1, k_s2;
  const void* v;
  int64_t v_s0, v_s1, v_s2;
  const uint8_t* key_mask;
  int64_t mask_s0;
  const int32_t* seqlens;
  void* out;
  int64_t o_s0, o_s1;
  double scale;

  // k and v (each [B, Hkv, L', D] with L' >= l): their data and strides.
  void set_kv(const at::Tensor& keys, const at::Tensor& values) {
    k = keys.data_ptr();
    k_s0 = keys.stride(0);
    k_s1 = keys.stride(1);
    k_s2 = keys.stride(2);
    v = values.data_ptr();
    v_s0 = values.stride(0);
    v_s1 = values.stride(1);
    v_s2 = values.stride(2);
  }
};
void decode_attention_run(const DecodeAttention& a);

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

// One quantized weight of quant_linear_run as raw pointers, made by quant_weight from checked
// tensors (ops.quant's layout; k: x's K; bias: float32 [rows] or null). decode_layers checks
// every weight at the start of a step (check_quant_weight) and takes each layer's pointers
// (quant_weight_unchecked) as the layer starts.
struct QuantWeight {
  const uint8_t* w;        // int8 [rows, k] or packed int4 [rows, k / 2]
  int bits;                // 8 or 4
  int64_t group;           // int4 group size (0 for int8)
  const uint16_t* scales;  // bf16 [rows] or [rows, k / group]
  const float* bias;
  int64_t rows;
};
QuantWeight quant_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, size_t index,
                         const float* bias);
// quant_weight's checks alone (metadata only; index and op name the weight in errors): its bits.
int check_quant_weight(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, size_t index,
                       const char* op = "quant_linear");
// quant_weight without the checks, for a weight check_quant_weight accepted with these bits.
QuantWeight quant_weight_unchecked(const at::Tensor& qweight, const at::Tensor& scales, int64_t k, int bits,
                                   const float* bias);

// quant_linear_into after its checks: x bf16 [rows_x, k] (contiguous) through the weights into y
// bf16 [rows_x, sum of their rows] (contiguous), the outputs side by side.
void quant_linear_run(const uint16_t* x, int64_t rows_x, int64_t k, c10::ArrayRef<QuantWeight> weights, uint16_t* y);

// silu(gate) * up for `rows` bf16 rows of n (gate and up rows row_stride apart, out rows
// contiguous), bit for bit ATen's at::silu_out then at::mul_out; false, with nothing written,
// where this build cannot promise that (then run ATen's). silu_mul_aten.cpp says how.
bool silu_mul_rows_as_aten(const uint16_t* gate, const uint16_t* up, int64_t row_stride, uint16_t* out, int64_t rows,
                           int64_t n);
// Whether silu_mul_rows_as_aten runs here (checked once, against ATen, at the first call).
bool silu_mul_matches_aten();

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace idefics3_kit
