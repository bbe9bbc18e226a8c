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

The step may end with the LM head too (``head``, ``logits``): the final norm's output through the
head weight, written into the caller's ``logits``, as ``ops.linear(lm_head, normed)`` computes it
(the same kernel: ``decode_linear``, ``quant_linear``, or ``F.linear`` in float32). Run inside the
op, the head is one more piece of the step's team of threads instead of a call of its own (a
dispatched op, a parallel region and ~30-80 µs of Python at SmolVLM-256M shapes).
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


def _head_applies(x: torch.Tensor, head: torch.Tensor, head_scale: torch.Tensor | None, logits: torch.Tensor) -> bool:
    """Whether the op's head runs the kernel ``ops.linear(lm_head, normed)`` would run on this
    step's normed output ([B, 1, D] like x): ``decode_linear``'s for a bf16 weight (``matmul.applies``),
    ``quant_linear``'s for a quantized one (``quant.applies``), ``F.linear`` for float32 (plain
    tensors); and logits a plain, contiguous [B, 1, V] tensor in x's dtype."""
    if fast_path.plain_tensors((logits,), dtype=x.dtype, contiguous=True) != "cpu":
        return False
    if logits.shape != (x.shape[0], 1, head.shape[0]) or head.dim() != 2:
        return False
    if head_scale is not None:
        return quant.applies(x, [head], [head_scale], [None])
    if head.shape[1] != x.shape[-1]:
        return False
    if x.dtype == torch.bfloat16:
        return matmul.applies(x, [head], [None])
    return fast_path.plain_tensors((head,), dtype=x.dtype, contiguous=True) == "cpu"


def decode_layers(x: torch.Tensor, layer_weights: Sequence[tuple] | LayerWeights, k_cache: Sequence[torch.Tensor],
                  v_cache: Sequence[torch.Tensor], cos: torch.Tensor, sin_signed: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, past: int, num_heads: int, num_kv_heads: int,
                  eps: float, modules: Sequence[nn.Module] = (),
                  layer_scales: Sequence[tuple] | None = None,
                  final_norm: torch.Tensor | None = None, head: torch.Tensor | None = None,
                  head_scale: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [B, 1, D] through every layer -> [B, 1, D], or None when the op does not apply.

    cos/sin_signed: [B or 1, 1, 1, hd] rotary tables of the new position, the sine with its first
    half negated (x * cos + roll(x, hd/2) * sin_signed is the rotation); ``modules``: every module
    whose forward the op replaces (they must be plain, see ``fast_path``); ``layer_weights`` and
    ``layer_scales`` as ``LayerWeights`` takes them, or a ``LayerWeights`` built once (then no
    ``layer_scales``); ``final_norm``: the decoder's final RMSNorm weight [D] (same eps, x's dtype),
    which the op then applies to its output (as the decoder's norm module would, bit for bit),
    or None for the residual stream itself. ``head`` (with ``final_norm`` and ``logits``): the LM
    head's weight [V, D] in x's dtype, or an ``ops.quant.QuantizedLinear``'s qweight with its scales
    as ``head_scale``; the op then also writes the normed output through it into ``logits``
    [B, 1, V] (contiguous, x's dtype), bit-identical to ``ops.linear`` of that head. Where the
    head's kernel would not be the one ``ops.linear`` runs, the op does not apply (None).
    """
    check_eps(eps, "decode_layers")
    if (head is None) != (logits is None) or head_scale is not None and head is None:
        raise ValueError("decode_layers: head and logits come together (head_scale only with a head)")
    if head is not None and final_norm is None:
        raise ValueError("decode_layers: a head needs final_norm (the head reads the final norm's output)")
    if isinstance(layer_weights, LayerWeights):
        if layer_scales is not None:
            raise ValueError("decode_layers: a LayerWeights carries its scales; pass layer_scales=None")
        weights = layer_weights
    else:
        weights = LayerWeights(layer_weights, layer_scales)
    rope_mask_norm = (cos, sin_signed, key_padding_mask, final_norm, head, head_scale, logits)
    if not weights.layers or not _applies(x, weights, k_cache, v_cache, rope_mask_norm, k_cache[0].shape[-1], modules):
        return None
    if head is not None and logits is not None and not _head_applies(x, head, head_scale, logits):
        return None  # (logits is given with a head: checked above)
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
                int(num_kv_heads), float(eps), weights.scales or [], final_norm, head, head_scale, logits)


@_library.register_fake("decode_layers")
def _decode_layers_fake(x, params, k_cache, v_cache, cos, sin_signed, key_mask, past, num_heads, num_kv_heads, eps,
                        scales=(), final_norm=None, head=None, head_scale=None, logits=None):
    _library.same_device("decode_layers", (("x", x), *((f"params[{i}]", p) for i, p in enumerate(params)),
                                           *((f"k_cache[{i}]", c) for i, c in enumerate(k_cache)),
                                           *((f"v_cache[{i}]", c) for i, c in enumerate(v_cache)),
                                           ("cos", cos), ("sin_signed", sin_signed), ("key_mask", key_mask),
                                           ("final_norm", final_norm), ("head", head),
                                           ("head_scale", head_scale), ("logits", logits)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)
