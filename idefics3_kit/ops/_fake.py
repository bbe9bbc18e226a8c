"""Fake (meta) implementations of the compiled ops, so they trace under torch.compile.

Registered only when the extension loaded (the op must exist before a fake can be attached);
every fake is pure shape math from the arguments, never reading data.
"""

from __future__ import annotations

import torch

_registered = False


def attention_out(q: torch.Tensor) -> torch.Tensor:
    """Output of the attention ops: [B, H, L, D] values stored as [B, L, H, D] in memory, so that
    the callers' ``transpose(1, 2).reshape(B, L, H * D)`` is free."""
    b, h, lq, d = q.shape
    return q.new_empty((b, lq, h, d)).transpose(1, 2)


def register() -> None:
    global _registered
    if _registered or not hasattr(torch.ops, "idefics3_kit"):
        return
    ns = torch.ops.idefics3_kit
    lib = "idefics3_kit::"

    if hasattr(ns, "resize_u8"):
        @torch.library.register_fake(lib + "resize_u8")
        def _resize_u8(image, out_h, out_w):
            torch._check(image.dim() == 3, lambda: "resize_u8: image must be [H, W, C]")
            return image.new_empty((out_h, out_w, image.shape[2]))

    if hasattr(ns, "preprocess_into"):
        @torch.library.register_fake(lib + "preprocess_into")
        def _preprocess_into(images, pixel_values, pixel_mask, geometry, mean, std, rescale):
            return None

    for name in ("vision_attention", "prefill_attention"):
        if hasattr(ns, name):
            torch.library.register_fake(lib + name)(lambda q, k, v, key_mask, scale: attention_out(q))

    if hasattr(ns, "decode_attention"):
        @torch.library.register_fake(lib + "decode_attention")
        def _decode(q, k, v, key_mask, cache_seqlens, scale):
            return attention_out(q)

    if hasattr(ns, "decode_linear"):
        @torch.library.register_fake(lib + "decode_linear")
        def _decode_linear(x, weights, biases):
            torch._check(len(weights) > 0, lambda: "decode_linear: weights must not be empty")
            return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))

    if hasattr(ns, "rms_norm"):
        @torch.library.register_fake(lib + "rms_norm")
        def _rms_norm(x, weight, eps):
            return torch.empty_like(x, memory_format=torch.contiguous_format)

    if hasattr(ns, "decode_layers"):
        @torch.library.register_fake(lib + "decode_layers")
        def _decode_layers(x, params, k_cache, v_cache, cos, sin_signed, key_mask, past, num_heads, num_kv_heads,
                           eps):
            return torch.empty_like(x, memory_format=torch.contiguous_format)

    if hasattr(ns, "empty_pooled"):
        @torch.library.register_fake(lib + "empty_pooled")
        def _empty_pooled(size, dtype):
            return torch.empty(size, dtype=dtype)

    _registered = True
