"""Scaled dot-product attention shared by every tower.

One entry point, ``attention``, covers the three cases the model needs:
- vision encoder: non-causal, with a key padding mask (patches of partially padded tiles);
- decoder prefill: causal, grouped-query, with a key padding mask (left padding);
- decoder decode: one query per sequence against the KV cache.

The reference implementation below is the specification; compiled kernels must match it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _library


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q/k/v [B, H, L, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} "
                         "in batch and head dim")
    if hq % k.shape[1] != 0:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {k.shape[1]} key/value heads")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, k.shape[2]):
        raise ValueError(f"attention: key_padding_mask must be [B, Lk] = {(b, k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")


def build_mask(lq: int, lk: int, causal: bool, key_padding_mask: torch.Tensor | None,
               device) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Lq, Lk], True = may attend; None when nothing is masked.

    With ``causal``, query i sits at absolute position ``lk - lq + i`` (the queries are the last
    ``lq`` positions of the key range, as in cached decoding).
    """
    mask = None
    if causal:
        qpos = torch.arange(lk - lq, lk, device=device)[:, None]
        kpos = torch.arange(lk, device=device)[None, :]
        mask = (kpos <= qpos)[None, None]  # [1, 1, Lq, Lk]
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, Lk]
        mask = kpm if mask is None else (mask & kpm)
    return mask


def _open_empty_rows(mask: torch.Tensor | None):
    """(mask with fully masked rows opened, those rows [.., Lq, 1]) or (mask, None).

    A query that may attend to nothing (a left-padding position under a causal mask) gets an
    output of exactly 0, as torch's fused kernels and transformers give; opening the row first
    keeps the softmax finite.
    """
    if mask is None:
        return None, None
    empty = ~mask.any(dim=-1, keepdim=True)
    if not bool(empty.any()):
        return mask, None
    return mask | empty, empty


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Reference attention. q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    Softmax runs in float32 whatever the input dtype (as transformers' eager path does), and
    each key/value head serves ``Hq / Hkv`` consecutive query heads. Fully masked query rows
    give 0.
    """
    _check(q, k, v, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, Hq, Lk, D]
        v = v.repeat_interleave(groups, dim=1)
    mask, empty = _open_empty_rows(build_mask(q.shape[2], k.shape[2], causal, key_padding_mask, q.device))
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, Hq, Lq, Lk], as transformers' eager
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return out if empty is None else out.masked_fill(empty, 0)


def attention_sdpa(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
    """Same semantics through torch's fused scaled_dot_product_attention (faster reference)."""
    _check(q, k, v, key_padding_mask)
    mask, empty = _open_empty_rows(build_mask(q.shape[2], k.shape[2], causal, key_padding_mask, q.device))
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out if empty is None else out.masked_fill(empty, 0)


def zero_empty_rows(out: torch.Tensor, causal: bool, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Set to 0 the query rows that may attend to nothing (the reference semantics).

    The CUDA kernels keep such rows finite by opening them up; this makes their output equal
    to the reference without a host synchronisation: with a causal mask, query i (key
    position Lk - Lq + i) is empty iff no unmasked key lies at or before it.
    """
    if key_padding_mask is None:
        return out  # every query has at least key 0 (causal) or every key (non-causal)
    lq, lk = out.shape[2], key_padding_mask.shape[1]
    kpm = key_padding_mask.to(device=out.device, dtype=torch.bool)
    if causal:
        seen = kpm.cumsum(dim=-1)[:, lk - lq:] > 0  # [B, Lq]
    else:
        seen = kpm.any(dim=-1, keepdim=True).expand(-1, lq)  # [B, Lq]
    return out * seen[:, None, :, None].to(out.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention used by every component; the compiled kernels plug in here.

    The compiled kernels are inference kernels (no backward): when gradients are needed the
    reference path runs.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad and _library.use_compiled():
        if q.is_cuda:
            from . import cuda_dispatch

            out = cuda_dispatch.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
            if out is not None:  # the CUDA kernels still open empty rows (CPU ones write 0 themselves)
                return zero_empty_rows(out, causal, key_padding_mask)
        else:
            from . import attention_compiled

            out = attention_compiled.dispatch(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                              scale=scale)
            if out is not None:
                return out
    return attention_sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
