"""Routing of the Python ops to the CUDA kernels (csrc/cuda/), when they are built.

Nothing here imports anything CUDA-specific at module import time, so it is safe on CPU-only
machines: every function answers "no CUDA kernel" (False / None) there.

Wiring (see docs/cuda.md):
- ``ops.attention.attention`` (or ``attention_compiled.dispatch``) calls :func:`attention`
  first for CUDA tensors and falls back when it returns None;
- ``ops.preprocess.preprocess_into`` already calls ``torch.ops.idefics3_kit.preprocess_into``
  when the extension is loaded: with CUDA outputs the dispatcher picks the CUDA kernel
  (host or device uint8 images both work); :func:`preprocess_into` is the explicit form;
- ``Processor(device="cuda")`` allocates ``pixel_values``/``pixel_attention_mask`` on the GPU
  with :func:`alloc_batch` and calls ``preprocess_into`` with the host images.
"""

from __future__ import annotations

import math

import torch

from . import _library

_NS = "idefics3_kit"
VISION_HEAD_DIMS = (64, 72, 128)
DECODER_HEAD_DIMS = (64, 128)


def has_cuda_kernel(op: str) -> bool:
    """True when ``idefics3_kit::<op>`` has a CUDA kernel registered (extension built with CUDA)."""
    if not _library.use_compiled() or not torch.cuda.is_available():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{_NS}::{op}", "CUDA"))
    except RuntimeError:  # op not defined at all
        return False


def alloc_batch(batch: int, tiles: int, tile: int, *, device="cuda", dtype=torch.float32,
                mask_dtype=torch.int64):
    """Zeroed ``pixel_values`` [B, T, 3, S, S] and ``pixel_attention_mask`` [B, T, S, S] on ``device``.

    The op writes only the real tiles; padding tiles stay zero (as transformers pads).
    """
    pv = torch.zeros(batch, tiles, 3, tile, tile, device=device, dtype=dtype)
    pm = torch.zeros(batch, tiles, tile, tile, device=device, dtype=mask_dtype)
    return pv, pm


def preprocess_into(images, pixel_values, pixel_mask, geometry, mean, std, rescale) -> None:
    """The CUDA preprocessing op (images: uint8 [H, W, 3] on the host or on the outputs' GPU)."""
    if not has_cuda_kernel("preprocess_into"):
        raise RuntimeError("idefics3_kit: the CUDA preprocessing kernel is not built")
    from .preprocess import _check_geometry

    _check_geometry(images, pixel_values, pixel_mask, geometry)
    torch.ops.idefics3_kit.preprocess_into(list(images), pixel_values, pixel_mask, [int(x) for x in geometry],
                                           [float(x) for x in mean], [float(x) for x in std], float(rescale))


def _supported(q, k, v, key_padding_mask, head_dims) -> bool:
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.shape[-1] not in head_dims:
        return False
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        return False
    return True


def attention(q, k, v, *, causal: bool = False, key_padding_mask=None, scale=None):
    """The CUDA attention kernels for ``ops.attention.attention``'s semantics, or None.

    Lq == 1 -> decode_attention (the single query sees every key either way); causal ->
    prefill_attention (query i at key position Lk - Lq + i); else vision_attention.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    if q.shape[2] == 1:
        if not (_supported(q, k, v, kpm, DECODER_HEAD_DIMS) and has_cuda_kernel("decode_attention")):
            return None
        return torch.ops.idefics3_kit.decode_attention(q, k, v, kpm, None, scale)
    if causal:
        if q.shape[2] > k.shape[2]:
            return None
        if not (_supported(q, k, v, kpm, DECODER_HEAD_DIMS) and has_cuda_kernel("prefill_attention")):
            return None
        return torch.ops.idefics3_kit.prefill_attention(q, k, v, kpm, scale)
    if not (_supported(q, k, v, kpm, VISION_HEAD_DIMS) and has_cuda_kernel("vision_attention")):
        return None
    return torch.ops.idefics3_kit.vision_attention(q, k, v, kpm, scale)
