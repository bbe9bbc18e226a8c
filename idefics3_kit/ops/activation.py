"""Activations as compiled passes: ``gelu_tanh_`` (SigLIP's MLP, transformers' "gelu_pytorch_tanh").

The reference is ``F.gelu(x, approximate="tanh")``. The compiled op (float32 / bfloat16 on CPU,
csrc/include/idefics3_kit/activation.h) overwrites x with the same function computed in float32
and rounded once, as torch's bf16 GELU does: the two differ only where float32 rounding tips a
bf16 rounding (tested against float64 within torch's own error).

Why it exists: ``ops.dense`` put SigLIP's GELU in oneDNN's fc1 epilogue, which on a 2-core AMD Zen 4
took 2.7-3.5 ms of a 25 ms [2048 x 768] @ [768 x 3072] bf16 call; torch's bf16 ``F.gelu`` as a
separate pass took 6.1 ms; this pass ~1.3 ms (``python benchmarks/activation.py``). Where it
applies is ``dense_linear.gelu_pass``. On AVX2-only CPUs (AMD Zen 2 / Zen 3), where the bf16 tower
runs as float32 and its GELU runs after the linear, the pass's AVX2 path replaces torch's float32
``F.gelu`` there: 3.1 against 11.6 ms per [2048 x 3072] fc1 output on a 2-core Zen 3
(``python benchmarks/activation.py --dtype fp32``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _library, fast_path

DTYPES = (torch.float32, torch.bfloat16)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh: x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def vectorized() -> bool:
    """Whether the compiled pass has a vector path on this CPU (AVX-512, or AVX2 with FMA) and is
    built: elsewhere its portable loop is slower than torch's own GELU (3x on a Zen 3)."""
    return ((_library.cpu_has("avx512f") or (_library.cpu_has("avx2") and _library.cpu_has("fma")))
            and _library.has_kernel("gelu_tanh_", "cpu"))


def gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """x <- gelu_tanh(x), in place; returns x. The compiled pass for plain contiguous CPU float32 /
    bfloat16 tensors that need no grad, torch's in-place GELU otherwise."""
    if x.dtype in DTYPES and x.is_contiguous() and fast_path.usable("gelu_tanh_", (x,)):
        _library.op("gelu_tanh_")(x)
        return x
    return torch.ops.aten.gelu_(x, approximate="tanh")


@_library.register_fake("gelu_tanh_")
def _gelu_tanh_fake(x):
    return None
