// The one place where idefics3_kit's operator schemas are declared.
//
// Kernels register per backend in their own files (csrc/cpu/*.cpp for CPU, the binding
// files under csrc/cuda/ for CUDA); fake (meta) implementations live in Python
// (idefics3_kit/ops/<family>.py) so every op works under torch.compile.
//
// Conventions: images are uint8 [H, W, 3] (RGB, contiguous); attention tensors are
// [B, H, L, D] with stride(-1) == 1; masks are bool, True = attend.

#include <torch/library.h>

#ifndef IDEFICS3_KIT_NO_PYTHON  // CMake's C++ tests link the ops without Python
#include <Python.h>
#endif

TORCH_LIBRARY(idefics3_kit, m) {
  // Pillow-exact LANCZOS resize of a uint8 [H, W, C] image (C = 1 or 3).
  m.def("resize_u8(Tensor image, int out_h, int out_w) -> Tensor");
  // Resize chain + tiles + global tile + rescale/normalize written in place into the padded
  // batch (see idefics3_kit/ops/preprocess.py). geometry: 8 ints per image
  // (sample, first_tile, h1, w1, h2, w2, rows, cols).
  m.def(
      "preprocess_into(Tensor[] images, Tensor(a!) pixel_values, Tensor(b!) pixel_mask, int[] geometry, "
      "float[] mean, float[] std, float rescale) -> ()");
  // Non-causal attention with an optional key padding mask [B, L] (vision encoder).
  m.def("vision_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) -> Tensor");
  // Causal grouped-query attention; query i sits at key position Lk - Lq + i.
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) -> Tensor");
  // One query per sequence against the KV cache; k/v may be strided views of the cache.
  // cache_seqlens (int32 [B]), when given, bounds the valid keys of each row.
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? cache_seqlens, float scale) "
      "-> Tensor");
  // bf16 linear over a few rows (decode steps): x [..., K], weights [N_i, K] -> [..., sum N_i],
  // the outputs of the weights side by side (q|k|v, gate|up without a concatenated copy).
  m.def("decode_linear(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor");
  // Weight-only quantized linear over a few bf16 rows: qweights int8 [N_i, K] (scales [N_i]) or
  // packed int4 uint8 [N_i, K/2] (scales [N_i, K/g]), outputs side by side (idefics3_kit/ops/quant.py).
  m.def("quant_linear(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor?[] biases) -> Tensor");
  // The bf16 weight [N, K] of one quantized weight (bf16 scales): prefill dequantizes, then GEMM.
  m.def("quant_dequantize(Tensor qweight, Tensor scales) -> Tensor");
  // Llama RMSNorm: weight * cast(x * rsqrt(mean(x^2) + eps)), statistics in float32.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // Index of the first maximum of each row of x [..., V] (float32 / bfloat16) -> int64 [...]: torch.argmax's
  // rule (ties: the first; NaN counts as the largest, the first NaN wins).
  m.def("argmax_last(Tensor x) -> Tensor");
  // transformers' gelu_pytorch_tanh of x (float32 / bfloat16, contiguous), in place, computed in
  // float32 and rounded once (idefics3_kit/ops/activation.py).
  m.def("gelu_tanh_(Tensor(a!) x) -> ()");
  // Uninitialized CPU tensor whose memory goes back to a bounded pool when freed (large
  // preprocessing outputs reuse already-faulted pages); release_pooled frees the idle buffers.
  m.def("empty_pooled(int[] size, ScalarType dtype) -> Tensor");
  m.def("release_pooled() -> int");
  // Every layer of a one-token Llama decode step: x [B, 1, D] -> [B, 1, D]; params holds 12
  // entries per layer (input norm, q, k, v, q/k/v biases or None, o, post norm, gate, up, down);
  // the new keys/values are written at position `past` of each layer's cache [B, Hkv, Lmax, hd].
  // scales: empty, or one entry per params entry, set where that weight is quantized (quant_linear's
  // layout; bf16 x only). final_norm: the decoder's final RMSNorm weight [D], applied to the output
  // (same eps), or None for the residual stream itself. head (with final_norm and logits): the LM
  // head's weight [V, D] in x's dtype, or quantized (head_scale: its scales, quant_linear's layout);
  // the step then writes the final norm's output through it into logits [B, 1, V].
  m.def(
      "decode_layers(Tensor x, Tensor?[] params, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor cos, "
      "Tensor sin_signed, Tensor? key_mask, int past, int num_heads, int num_kv_heads, float eps, "
      "Tensor?[] scales, Tensor? final_norm=None, Tensor? head=None, Tensor? head_scale=None, "
      "Tensor(c!)? logits=None) -> Tensor");
}

#ifndef IDEFICS3_KIT_NO_PYTHON
namespace idefics3_kit {
PyMethodDef* python_methods();  // csrc/python/fast_path.cpp
}

// Importing idefics3_kit._C runs the static registrations above; the module's own functions are
// the compiled fast-path checks (csrc/python/fast_path.cpp).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, idefics3_kit::python_methods()};
  return PyModule_Create(&module_def);
}
#endif
