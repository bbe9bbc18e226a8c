"""Dispatch from ``ops.attention`` to the compiled CPU kernels.

- non-causal                 -> ``vision_attention`` (key padding mask, any Hq/Hkv ratio)
- causal, one query (decode) -> ``decode_attention`` (k/v may be strided views of the cache)
- causal, several queries    -> ``prefill_attention`` (queries are the last Lq of the Lk keys)

Returns None (the caller falls back to the reference) for what the kernels do not cover:
non-CPU tensors, dtypes other than float32/bfloat16, head dims that are not a multiple of 8
(or above 512), mixed dtypes, a last dim with stride != 1, causal with Lq > Lk, and CPUs
without AVX2 (the kernels' portable path would be slower than torch's own).

Policy from benchmarks/attention_cpu.py (2 threads, torch 2.13): for non-causal (vision)
attention torch's own fused CPU kernel (scaled_dot_product_attention) measured faster than our
GEMM + softmax blocks (x0.6-0.9), so those calls fall back to it (``PREFER_TORCH_NONCAUSAL``;
set it False to run the compiled vision kernel). Causal prefill (x1.0-1.9) and decode (x2.3-3.7)
use the compiled kernels.
"""

from __future__ import annotations

import math

import torch

from . import _library

_DTYPES = (torch.float32, torch.bfloat16)
PREFER_TORCH_NONCAUSAL = True
_FAST_CPU = None


def _fast_cpu() -> bool:
    global _FAST_CPU
    if _FAST_CPU is None:
        try:
            _FAST_CPU = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "")
        except Exception:  # older torch: assume a modern x86/ARM CPU
            _FAST_CPU = True
    return _FAST_CPU


def supported(q, k, v, causal: bool, key_padding_mask) -> bool:
    """Whether a compiled kernel covers this call."""
    if q.device.type != "cpu" or not _library.has_extension() or not hasattr(torch.ops.idefics3_kit,
                                                                                "vision_attention"):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d % 8 or not 8 <= d <= 512 or k.shape[-1] != d or k.shape != v.shape:
        return False
    if q.shape[0] != k.shape[0] or k.shape[1] == 0 or q.shape[1] % k.shape[1] or k.shape[2] == 0:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if causal and q.shape[2] > k.shape[2]:
        return False
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[0], k.shape[2]):
        return False
    return _fast_cpu()


def dispatch(q, k, v, *, causal, key_padding_mask, scale):
    """Return the compiled result, or None when no compiled kernel covers this call."""
    if not supported(q, k, v, causal, key_padding_mask):
        return None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.to(torch.bool).contiguous()
    ops = torch.ops.idefics3_kit
    if q.shape[2] == 1:  # one query sees every (unmasked) key, causal or not: the decode kernel
        return ops.decode_attention(q, k, v, mask, None, scale)
    if PREFER_TORCH_NONCAUSAL and not causal:
        return None
    if not causal:
        return ops.vision_attention(q, k, v, mask, scale)
    return ops.prefill_attention(q, k, v, mask, scale)
