"""Tolerance helpers shared by the op tests (the house rule: bounds derived from PyTorch's own
low-precision error)."""

from __future__ import annotations

import math

import torch


def output_ulp(ref32: torch.Tensor, dtype: torch.dtype, where: torch.Tensor | None = None) -> float:
    """The spacing of ``dtype`` numbers at the largest (finite, where ``where``) output: two
    correct roundings of one value differ by up to this much. A bound of "twice the reference's
    own error" needs this floor when the reference's error is mostly its last rounding and that
    rounding landed luckily close (hypothesis found 2 keys, outputs near 3: the bf16 reference
    off by 0.005, a kernel by 0.0147, where the bf16 spacing is 0.0156)."""
    values = ref32.float().abs() if where is None else ref32.float().abs()[where]
    top = values.max().item() if values.numel() else 0.0
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else 0.0
