"""Linear layers on few rows (decode steps): the one owner of every small-batch linear path.

``linear(layer, x)`` is ``layer(x)`` and ``linears(x, layers)`` is ``[layer(x) for layer in
layers]``; where ``fast_path.usable`` allows it they run one of two faster paths, with
bit-identical results:

1. ``decode_linear`` (compiled, bf16 on CPUs with AVX-512 BF16, at most ``max_rows()`` rows): a
   one-token step reads every weight once for one row of activations; at the decoder's narrow
   shapes (K = 576) oneDNN's bf16 matmul streams the weights 1.2-1.7x slower than this loop
   (benchmarks/linear_cpu.py). It takes several weights at once (q|k|v, gate|up) and writes
   their outputs side by side, so fused projections need no concatenated weight copy. With AMX,
   4 to 16 rows (a batched decode step) run on the tile unit, still reading each weight once
   (gemv_amx.h): 0.8-0.9x oneDNN's packed-weight time at 5-16 rows, without the packed copy.
2. oneDNN-packed bf16 weights (up to ``PACKED_MAX_ROWS`` rows, after ``prepare_decode``):
   torch's bf16 ``F.linear`` re-lays-out the weight on every call, which dominates a decode
   step; a copy packed once (per layer, or concatenated for a group such as q|k|v) avoids it.
   The copy costs the weights' memory once more, so it is made only for models whose decoder
   weights take at most ``PREPACK_AUTO_MAX_BYTES`` (``IDEFICS3_KIT_PREPACK=0/1`` overrides).

3. many rows in bf16 (a prefill): oneDNN's linear called directly (dense_linear.py), with a packed
   copy of the weight where ``dense_linear.pack_weights`` asked for one (bit-identical).

The packed copies of 2. and 3. are kept by ops/packed.py.

Groups of ``ops.quant.QuantizedLinear`` layers go to the compiled ``quant_linear`` in one call.
Everything else (float32 beyond the decode sizes, autograd, a wrapped or hooked layer, a
torchao-quantized or distributed weight) runs the layer itself.
"""

from __future__ import annotations

import os
import weakref
from typing import Sequence, cast

import torch
import torch.nn as nn

from . import _library, fast_path, packed, quant
from .dense_linear import dense

# Rows up to which the compiled kernel is used (measured at SmolVLM-256M shapes, 2 threads): one row
# 1.2-1.7x faster than oneDNN, two ~1.2x, four about even per projection (0.8-1.5x; vdpbf16ps
# turns compute-bound while oneDNN's AMX path shares each weight load). Up to four rows it still
# pays: it lets decode_layers run the whole step (bf16 batch 4 decode 1.56x -> 1.97x transformers).
MAX_ROWS = 4
AMX_MAX_ROWS = 16  # with AMX the kernel takes 4..16 rows on the tile unit (gemv_amx.h): K multiple of 32 there
PACKED_MAX_ROWS = 32  # packed weights checked bit-identical for every decoder shape and 1..32 rows
PREPACK_AUTO_MAX_BYTES = 2 * 1024 ** 3


def decode_linear_ref(x: torch.Tensor, weights, biases=None) -> torch.Tensor:
    """Reference: each weight's linear accumulated in float32, bias added, rounded once to x's
    dtype; the outputs concatenated on the last dim."""
    biases = biases if biases is not None else [None] * len(weights)
    outs = []
    for w, b in zip(weights, biases):
        y = x.float() @ w.float().T
        outs.append((y if b is None else y + b.float()).to(x.dtype))
    return torch.cat(outs, dim=-1)


def max_rows() -> int:
    """The most rows the compiled kernel takes here: AMX_MAX_ROWS on a CPU with AMX-BF16 (a K that
    is not a multiple of 32 then runs the AVX-512 loop, slower than oneDNN past four rows but
    right), else MAX_ROWS."""
    return AMX_MAX_ROWS if _library.cpu_has("amx_bf16") else MAX_ROWS


def kernel_isa() -> bool:
    """Whether this CPU has a vector path of the compiled kernel (gemv_bf16.h): AVX-512 BF16, or
    AVX2 with FMA (AMD Zen 2/3, older Intel), where torch's own bf16 linear is slower still."""
    return _library.cpu_has("avx512_bf16") or (_library.cpu_has("avx2") and _library.cpu_has("fma"))


def covers(rows: int, dtype: torch.dtype) -> bool:
    """Whether the compiled kernel's size and type rules take ``rows`` rows of ``dtype`` here
    (bf16, at most ``max_rows()`` rows, a CPU with one of its vector paths, the compiled backend)."""
    return (dtype == torch.bfloat16 and rows <= max_rows() and kernel_isa()
            and _library.has_kernel("decode_linear", "cpu"))


def applies(x: torch.Tensor, weights, biases=None) -> bool:
    """Whether ``decode_linear`` runs the compiled kernel for this input, weights [N_i, K] and
    biases; anything the op would refuse (a non-contiguous or non-bf16 weight, a bias of another
    shape or dtype) makes it False, so callers fall back."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    biases = list(biases) if biases is not None else []
    if x.dim() == 0 or x.shape[-1] == 0 or not weights or not covers(x.numel() // x.shape[-1], x.dtype):
        return False
    if not fast_path.usable("decode_linear", (x, *weights, *biases)):
        return False
    for w in weights:
        if not (w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() and w.shape[1] == x.shape[-1]):
            return False
    for w, b in zip(weights, biases):
        if b is not None and not (b.dim() == 1 and b.shape[0] == w.shape[0] and b.dtype in (torch.bfloat16,
                                                                                            torch.float32)):
            return False
    return True


def decode_linear(x: torch.Tensor, weights, biases) -> torch.Tensor | None:
    """x [..., K] @ each of ``weights`` [N_i, K] (+ bias) -> [..., sum N_i], or None when the
    compiled kernel does not apply."""
    if not applies(x, weights, biases):
        return None
    return _library.op("decode_linear")(x, list(weights), list(biases))


@_library.register_fake("decode_linear")
def _decode_linear_fake(x, weights, biases):
    _library.same_device("decode_linear", (("x", x), *((f"weights[{i}]", w) for i, w in enumerate(weights)),
                                           *((f"biases[{i}]", b) for i, b in enumerate(biases))))
    torch._check(len(weights) > 0, lambda: "decode_linear: weights must not be empty")
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


# ---- oneDNN-packed weights (kept by ops/packed.py) ----------------------------------------------

_PREPARED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # nn.Linear layers packed for decode steps
DECODE_ROWS = 1  # the row count decode copies are packed for


def packed_for(layers: Sequence[nn.Linear]):
    """The fresh decode copy of ``layers`` if one was made, else None (stale copies don't count)."""
    return packed.fresh(layers, DECODE_ROWS)


def _packed_linear(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor | None:
    if x.dtype != torch.bfloat16 or x.numel() > PACKED_MAX_ROWS * x.shape[-1] or torch.is_grad_enabled():
        return None
    if any(layer not in _PREPARED or layer.bias is not None for layer in layers) or len(layers) > 1 and len(
            {(layer.weight.dtype, layer.weight.device) for layer in layers}) != 1:
        return None
    if not packed.can_pack(layers[0].weight) or not _library.fast_paths_on():
        return None
    return torch.ops.mkldnn._linear_pointwise(x, packed.get(layers, DECODE_ROWS), None, "none", [], "")


def prepare_decode(module: nn.Module, batch_size: int) -> bool:
    """Let the plain bf16 linears under ``module`` use packed weights for decode steps of
    ``batch_size`` rows, when that pays: not where the compiled few-row kernel (which reads the
    plain weights) already covers the batch, and only for weights of at most
    ``PREPACK_AUTO_MAX_BYTES`` (the packed copy doubles them). ``IDEFICS3_KIT_PREPACK=0``: never,
    ``=1``: always. Returns whether anything was prepared."""
    setting = os.environ.get("IDEFICS3_KIT_PREPACK", "auto")
    if setting == "0" or batch_size > PACKED_MAX_ROWS:
        return False
    weight = next(module.parameters(), None)
    if weight is None or not packed.can_pack(weight):
        return False
    if setting != "1":
        if covers(batch_size, weight.dtype):
            return False
        if sum(p.numel() * p.element_size() for p in module.parameters()) > PREPACK_AUTO_MAX_BYTES:
            return False
    prepared = False
    for layer in module.modules():
        if type(layer) is nn.Linear and type(layer.weight) in fast_path.PLAIN_TENSOR_TYPES:
            _PREPARED.add(layer)
            prepared = True
    return prepared


def unpack(module: nn.Module) -> None:
    """Drop the decode copies under ``module`` (frees their memory) and stop packing its layers."""
    packed.drop(module, DECODE_ROWS)
    for layer in module.modules():
        _PREPARED.discard(layer)


# ---- the entry points the components call ---------------------------------------------------------


def _fast(x: torch.Tensor, modules: Sequence[nn.Module]) -> torch.Tensor | None:
    if not fast_path.plain_modules(modules):
        return None
    layers = cast("Sequence[nn.Linear]", modules)  # plain modules the callers pass as linear layers
    if any(type(layer) is quant.QuantizedLinear for layer in modules):
        return _quantized(x, modules)
    y = decode_linear(x, [layer.weight for layer in layers], [layer.bias for layer in layers])
    if y is not None:
        return y
    if fast_path.plain_tensors((x, *(layer.weight for layer in layers))) is None or torch.compiler.is_compiling():
        return None
    return _packed_linear(x, layers)


def _quantized(x: torch.Tensor, layers) -> torch.Tensor | None:
    """A group of quantized layers in one compiled call (q|k|v, gate|up); None for a mixed group
    or where the kernel does not apply (each layer then runs its own forward)."""
    if not all(type(layer) is quant.QuantizedLinear for layer in layers):
        return None
    args = ([layer.qweight for layer in layers], [layer.scales for layer in layers], [layer.bias for layer in layers])
    return _library.op("quant_linear")(x, *args) if quant.applies(x, *args) else None


def _many_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; bf16 inference on many rows (a prefill) through oneDNN's linear without the
    per-call weight re-layout of ``F.linear`` (dense_linear.py): bit-identical in bf16, checked in
    tests/ops/test_dense_linear.py. Float32 keeps ``F.linear`` (MKL), whose rounding the decode
    steps share."""
    if x.dtype == torch.bfloat16:
        return dense(layer, x)
    return layer(x)


def linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, through a faster path where one applies (bit-identical)."""
    y = _fast(x, (layer,))
    return _many_rows(layer, x) if y is None else y


def linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """``[layer(x) for layer in layers]``; on a fast path one call computes them all and the
    outputs are split views of one tensor (bit-identical to the separate calls)."""
    y = _fast(x, layers)
    if y is None:
        return [_many_rows(layer, x) for layer in layers]
    # a fast path ran: plain nn.Linear or QuantizedLinear layers
    return list(y.split([layer.out_features if type(layer) is quant.QuantizedLinear
                         else cast(nn.Linear, layer).weight.shape[0] for layer in layers], dim=-1))
