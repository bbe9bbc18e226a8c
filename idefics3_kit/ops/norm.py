"""RMSNorm as one op: ``rms_norm(x, weight, eps)``.

The reference is transformers' LlamaRMSNorm: statistics in float32, the normalized row cast back
to x's dtype, then multiplied by the weight in that dtype. torch runs that as several ATen ops
per call (F.rms_norm decomposes into pow, mean, add, rsqrt and mul, plus the two casts and the
weight multiply); a one-token decode step calls it twice per layer on a single row, where those
per-op costs are the whole cost. The compiled kernel (bfloat16 only: float32 keeps torch's, so
float32 logits stay equal to transformers') does one pass per row. Its sum of squares is added
in another order, so the normalized row can differ from the reference by float32 rounding: at
most one bf16 ulp before the weight multiplies it, and |weight| times that ulp plus one rounding
of the product after (tested).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from . import _library, fast_path


def check_eps(eps: float, op: str = "rms_norm") -> None:
    """eps must be a finite number >= 0: a negative one makes the rms of a small row imaginary
    (NaN), and the compiled op refuses it; the reference and the wrappers refuse it alike."""
    value = float(eps) if isinstance(eps, numbers.Real) and not isinstance(eps, bool) else math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * cast(x / rms(x)), the statistics in float32 (F.rms_norm: bit-identical to the
    three-op formula over dtypes and widths 1..8192)."""
    check_eps(eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dim; the compiled kernel for CPU bfloat16 inference, else the
    reference (float32, autograd, other devices and dtypes, mixed dtypes, tensor subclasses)."""
    check_eps(eps)
    if (x.dtype == torch.bfloat16 and weight.dtype == x.dtype and x.dim() >= 1
            and fast_path.usable("rms_norm", (x, weight))):
        return _library.op("rms_norm")(x, weight, float(eps))
    return _rms_norm(x, weight, eps)  # (eps checked above)


@_library.register_fake("rms_norm")
def _rms_norm_fake(x, weight, eps):
    _library.same_device("rms_norm", (("x", x), ("weight", weight)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)
