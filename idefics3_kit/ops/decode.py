"""``decode_layers``: every layer of a one-token Llama decode step in one compiled call.

The C++ op runs the same ATen ops and kernels, in the same order and on the same layouts, as
the Python layers run for this step (RMSNorm, q|k|v projection, rotary embedding, cache write,
decode attention, o_proj, residual, RMSNorm, gate|up, SiLU gate, down, residual), so the result
is bit-identical to them; what goes away is the Python between the ~40 ops of each layer, which
at SmolVLM-256M shapes is a third of a bf16 decode step.

The op's contract, which the caller (a decoder that knows its layers are plain Llama layers:
SiLU-gated MLP, no o_proj or MLP biases, one RMSNorm eps) vouches for: ``layer_weights`` holds
one ``LAYER_WEIGHTS``-ordered tuple per layer; the caches are [B, Hkv, Lmax, hd] in x's dtype and
the new token is written at ``past``. The wrapper returns None where the op does not apply, and
the caller then runs its layers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import _library, fast_path, matmul, quant
from .norm import check_eps

LAYER_WEIGHTS = ("input_norm", "q", "k", "v", "q_bias", "k_bias", "v_bias", "o", "post_norm", "gate", "up", "down")


class LayerWeights:
    """Every layer's weights (and the scales of quantized ones) in the op's flat order, with the
    split ``_applies`` checks. Built once per decode plan (components/decoder.py caches one for a
    generation), since flattening and splitting ~400 tensors at every step cost tens of µs.

    ``layer_weights``: one ``LAYER_WEIGHTS``-ordered tuple per layer; ``layer_scales``: per layer,
    a ``LAYER_WEIGHTS``-ordered tuple holding the scales of each quantized weight
    (``ops.quant.QuantizedLinear``: the weight slot then holds its qweight) and None elsewhere, or
    None when no weight is quantized.
    """

    def __init__(self, layer_weights: Sequence[tuple], layer_scales: Sequence[tuple] | None = None):
        self.layers = len(layer_weights)
        self.flat = [p for weights in layer_weights for p in weights]
        self.scales = [s for per_layer in layer_scales for s in per_layer] if layer_scales else None
        if self.scales is not None:
            if len(self.scales) != len(self.flat):
                raise ValueError(f"decode_layers: layer_scales must match layer_weights: {len(self.scales)} "
                                 f"scales for {len(self.flat)} weights")
            self.plain = [p for p, sc in zip(self.flat, self.scales) if sc is None]
            self.quantized = [p for p, sc in zip(self.flat, self.scales) if sc is not None]


def _applies(x: torch.Tensor, weights: LayerWeights, k_cache, v_cache, rope_and_mask, head_dim: int,
             modules) -> bool:
    if x.dim() != 3 or x.shape[1] != 1 or x.device.type != "cpu":
        return False
    dtype = x.dtype
    if dtype == torch.bfloat16:
        if not matmul.covers(x.shape[0], dtype):
            return False
    elif dtype != torch.float32:
        return False
    if head_dim % 8 or not 8 <= head_dim <= 512 or not _library.cpu_is_vectorized():
        return False
    # every tensor plain, on the CPU, no grad (usable); then layouts: the caches contiguous, each
    # weight contiguous and in x's dtype, or a quantized one (ops.quant's layout: its qweight and
    # bf16 scales contiguous; bf16 x only, on few rows). Few passes over the ~400 tensors: this
    # runs every decode step.
    if not fast_path.usable("decode_layers", (x, *rope_and_mask), modules):
        return False
    caches = (*k_cache, *v_cache)
    if any(c is None for c in caches) or fast_path.plain_tensors(caches, contiguous=True) != "cpu":
        return False
    if weights.scales is None:  # no quantized weight
        return fast_path.plain_tensors(weights.flat, dtype=dtype, contiguous=True) == "cpu"
    if dtype != torch.bfloat16 or x.shape[0] > quant.MAX_ROWS:  # past them quant_linear dequantizes
        return False
    return (fast_path.plain_tensors(weights.plain, dtype=dtype, contiguous=True) == "cpu"
            and fast_path.plain_tensors(weights.quantized, contiguous=True) == "cpu"
            and fast_path.plain_tensors(weights.scales, dtype=torch.bfloat16, contiguous=True) == "cpu")


def decode_layers(x: torch.Tensor, layer_weights: Sequence[tuple] | LayerWeights, k_cache: Sequence[torch.Tensor],
                  v_cache: Sequence[torch.Tensor], cos: torch.Tensor, sin_signed: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, past: int, num_heads: int, num_kv_heads: int,
                  eps: float, modules: Sequence[nn.Module] = (),
                  layer_scales: Sequence[tuple] | None = None,
                  final_norm: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [B, 1, D] through every layer -> [B, 1, D], or None when the op does not apply.

    cos/sin_signed: [B or 1, 1, 1, hd] rotary tables of the new position, the sine with its first
    half negated (x * cos + roll(x, hd/2) * sin_signed is the rotation); ``modules``: every module
    whose forward the op replaces (they must be plain, see ``fast_path``); ``layer_weights`` and
    ``layer_scales`` as ``LayerWeights`` takes them, or a ``LayerWeights`` built once (then no
    ``layer_scales``); ``final_norm``: the decoder's final RMSNorm weight [D] (same eps, x's dtype),
    which the op then applies to its output (as the decoder's norm module would, bit for bit),
    or None for the residual stream itself.
    """
    check_eps(eps, "decode_layers")
    if isinstance(layer_weights, LayerWeights):
        if layer_scales is not None:
            raise ValueError("decode_layers: a LayerWeights carries its scales; pass layer_scales=None")
        weights = layer_weights
    else:
        weights = LayerWeights(layer_weights, layer_scales)
    rope_mask_norm = (cos, sin_signed, key_padding_mask, final_norm)
    if not weights.layers or not _applies(x, weights, k_cache, v_cache, rope_mask_norm, k_cache[0].shape[-1], modules):
        return None
    if final_norm is not None and (final_norm.dtype != x.dtype or not final_norm.is_contiguous()):
        return None
    b = x.shape[0]
    if cos.shape[0] != b:  # positions shared by the batch: the layers broadcast them
        cos, sin_signed = cos.expand(b, -1, -1, -1), sin_signed.expand(b, -1, -1, -1)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    # the op through _C.decode_layers_call (its ~800 list entries read straight from the lists, the
    # same dispatcher call: csrc/python/decode_call.cpp) where it exists; torch.ops otherwise
    call = _library.compiled_function("decode_layers_call") or _library.op("decode_layers")
    k_list, v_list = (c if isinstance(c, (list, tuple)) else list(c) for c in (k_cache, v_cache))  # (a KVCache's lists)
    return call(x, weights.flat, k_list, v_list, cos, sin_signed, mask, int(past), int(num_heads),
                int(num_kv_heads), float(eps), weights.scales or [], final_norm)


@_library.register_fake("decode_layers")
def _decode_layers_fake(x, params, k_cache, v_cache, cos, sin_signed, key_mask, past, num_heads, num_kv_heads, eps,
                        scales=(), final_norm=None):
    _library.same_device("decode_layers", (("x", x), *((f"params[{i}]", p) for i, p in enumerate(params)),
                                           *((f"k_cache[{i}]", c) for i, c in enumerate(k_cache)),
                                           *((f"v_cache[{i}]", c) for i, c in enumerate(v_cache)),
                                           ("cos", cos), ("sin_signed", sin_signed), ("key_mask", key_mask),
                                           ("final_norm", final_norm)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)
