"""Scaled dot-product attention shared by every tower: the reference, the router, the fakes.

One entry point, ``attention``, covers the three cases the model needs:
- vision encoder: non-causal, with a key padding mask (patches of partially padded tiles);
- decoder prefill: causal, grouped-query, with a key padding mask (left padding);
- decoder decode: one query per sequence against the KV cache.

``attention_ref`` is the specification; ``attention_sdpa`` gives the same semantics through
torch's fused kernel and is the ordinary path. The router picks at most one compiled kernel:

- one query (decode, causal or not)  -> ``decode_attention`` (k/v may be strided cache views)
- causal, several queries (prefill)   -> ``prefill_attention`` (queries are the last Lq of Lk keys;
  bf16 on a CPU with AMX or AVX-512 BF16 runs the flash kernels' causal mode, else the blocked
  kernel)
- non-causal, several queries         -> ``vision_attention`` on CUDA, and on a CPU with AMX or
  AVX-512 BF16 for bf16 with head dim a multiple of 8 up to 128 (``_flash_vision``: the flash
  kernels, csrc/include/idefics3_kit/vision_amx.h on the tile unit, 1.1-1.5x torch's SDPA on
  SigLIP's shapes, and vision_avx512.h with VDPBF16PS); other CPU calls go straight to SDPA
  (``PREFER_TORCH_NONCAUSAL``: torch's fused kernel measured faster than our blocked one,
  x0.6-0.9) without entering the compiled path.

A kernel runs only where ``fast_path.usable`` allows it and it covers the shapes (below);
everything else, autograd included, runs ``attention_sdpa``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _library, fast_path

PREFER_TORCH_NONCAUSAL = True
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_DTYPES = (torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = {"vision_attention": (64, 72, 128), "prefill_attention": (64, 128), "decode_attention": (64, 128)}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q/k/v [B, H, L, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} "
                         "in batch and head dim")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
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
    """(mask with fully masked rows opened, those rows [.., Lq, 1]), or (None, None).

    A query that may attend to nothing (a left-padding position under a causal mask) gets an
    output of exactly 0, as torch's fused kernels and transformers give; opening the row first
    keeps the softmax finite. No branch on the mask's values, so it traces and exports.
    """
    if mask is None:
        return None, None
    empty = ~mask.any(dim=-1, keepdim=True)
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
    """Same semantics through torch's fused scaled_dot_product_attention: the ordinary path."""
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


# ---- the router ---------------------------------------------------------------------------------


def _kernel_name(q: torch.Tensor, causal: bool) -> str | None:
    if q.shape[2] == 1:  # one query sees every (unmasked) key, causal or not
        return "decode_attention"
    if causal:
        return "prefill_attention"
    if q.device.type == "cpu" and PREFER_TORCH_NONCAUSAL and not _flash_vision(q):
        return None
    return "vision_attention"


FLASH_MAX_HEAD_DIM = 128  # the C++ side's rule is attn::vamx::usable / attn::vavx::usable: keep them equal


def flash_head_dim(d: int) -> bool:
    """The head dims the CPU flash kernels take: multiples of 8 up to 128 (SigLIP's 64 and 72 among them)."""
    return d % 8 == 0 and 8 <= d <= FLASH_MAX_HEAD_DIM


def _flash_vision(q: torch.Tensor) -> bool:
    """Whether non-causal CPU attention on q goes to the vision_attention op rather than SDPA: bf16
    with a head dim its flash kernels take on a CPU with AMX (vision_amx.h), and bf16 with any head
    dim on a CPU with AVX-512 BF16 but no AMX (AMD Zen 4): up to 128 its flash kernel
    (vision_avx512.h), above that the blocked kernel, which also ran 1.7x SDPA there. Float32 stays
    with torch (our blocked kernel ran it at 0.9x)."""
    if q.dtype != torch.bfloat16:
        return False
    if _library.cpu_has("amx_bf16"):
        return flash_head_dim(q.shape[-1])
    return _library.cpu_has("avx512_bf16")


def _cpu_covers(q, k, v, causal) -> bool:
    d = q.shape[-1]
    return (q.dtype in CPU_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and d % 8 == 0 and 8 <= d <= 512
            and k.shape[2] > 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
            and not (causal and q.shape[2] > k.shape[2]) and _library.cpu_is_vectorized())


def _cuda_covers(name, q, k, v, causal) -> bool:
    return (q.dtype in CUDA_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in CUDA_HEAD_DIMS[name] and not (causal and q.shape[2] > k.shape[2]))


def compiled_kernel(q, k, v, causal: bool, key_padding_mask) -> str | None:
    """The compiled kernel that runs this call, or None for the ordinary path."""
    name = _kernel_name(q, causal)
    if name is None or not fast_path.usable(name, (q, k, v, key_padding_mask)):
        return None
    if q.device.type == "cpu":
        return name if _cpu_covers(q, k, v, causal) else None
    if not _cuda_covers(name, q, k, v, causal):
        return None
    device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
    trusted = _library.kernel_trusted(name, (device, dtype, head_dim),
                                      lambda: selfcheck(name, device, dtype, head_dim))
    return name if trusted else None


def run_kernel(name: str, q, k, v, causal: bool, key_padding_mask, scale: float | None) -> torch.Tensor:
    """Call the compiled ``name`` on q/k/v and give the reference's answer for empty rows."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    mask = None if key_padding_mask is None else key_padding_mask.to(torch.bool).contiguous()
    kernel = _library.op(name)
    out = kernel(q, k, v, mask, None, scale) if name == "decode_attention" else kernel(q, k, v, mask, scale)
    if q.device.type == "cuda":  # the CUDA kernels open empty rows; the CPU ones write 0 themselves
        out = zero_empty_rows(out, causal, key_padding_mask)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention used by every component: a compiled kernel where one applies, else SDPA."""
    _check(q, k, v, key_padding_mask)
    name = compiled_kernel(q, k, v, causal, key_padding_mask)
    if name is None:
        return attention_sdpa(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if name == "prefill_attention" and _library.bf16_as_float32(q):
        # the blocked kernel's bf16 GEMMs are oneDNN's; without them torch's bf16 mm is a slow loop
        # (an 892-token SmolVLM-256M prefill spent 7.5 of its 8.7 s in it on a Zen 3)
        out = run_kernel(name, q.float(), k.float(), v.float(), causal, key_padding_mask, scale)
        return out.to(q.dtype)  # (keeps the [B, L, H, D] memory layout)
    return run_kernel(name, q, k, v, causal, key_padding_mask, scale)


# The self-check's case per kernel: (query heads, kv heads, query length, key length, causal).
SELFCHECK_CASES = {"vision_attention": (4, 4, 37, 37, False), "prefill_attention": (4, 2, 45, 45, True),
                   "decode_attention": (4, 2, 1, 70, False)}


def selfcheck(name: str, device, dtype: torch.dtype, head_dim: int) -> tuple[bool, str]:
    """Run the kernel ``name`` on a small random case (padding included) and compare it with the
    reference in float32: within 4x the error of the reference computed in ``dtype`` itself
    (+1e-3), and finite. -> (ok, what was measured)."""
    hq, hkv, lq, lk, causal = SELFCHECK_CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, head_dim, generator=gen) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, :5] = False  # left padding in the second row
    q, k, v, mask = (t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (q, k, v, mask))
    with torch.no_grad():
        out = run_kernel(name, q, k, v, causal, mask, None).float()
        ref32 = attention_ref(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=mask)
        ref_low = attention_ref(q, k, v, causal=causal, key_padding_mask=mask).float()
    error = float((out - ref32).abs().max())
    allowed = 4 * float((ref_low - ref32).abs().max()) + 1e-3
    ok = bool(torch.isfinite(out).all()) and error <= allowed
    return ok, f"max error {error:.3g}, allowed {allowed:.3g}"


# ---- fake kernels (shapes only, for torch.compile) -----------------------------------------------


def attention_out(q: torch.Tensor) -> torch.Tensor:
    """Output of the attention ops: on the CPU [B, H, L, D] values stored as [B, L, H, D] in memory,
    so that the callers' ``transpose(1, 2).reshape(B, L, H * D)`` is free; the CUDA kernels write a
    contiguous [B, H, L, D]."""
    b, h, lq, d = q.shape
    if q.device.type == "cuda":
        return q.new_empty((b, h, lq, d))
    return q.new_empty((b, lq, h, d)).transpose(1, 2)


@_library.register_fake("vision_attention")
def _vision_fake(q, k, v, key_mask, scale):
    _library.same_device("vision_attention", (("q", q), ("k", k), ("v", v), ("key_mask", key_mask)))
    return attention_out(q)


@_library.register_fake("prefill_attention")
def _prefill_fake(q, k, v, key_mask, scale):
    _library.same_device("prefill_attention", (("q", q), ("k", k), ("v", v), ("key_mask", key_mask)))
    return attention_out(q)


@_library.register_fake("decode_attention")
def _decode_fake(q, k, v, key_mask, cache_seqlens, scale):
    _library.same_device("decode_attention", (("q", q), ("k", k), ("v", v), ("key_mask", key_mask),
                                              ("cache_seqlens", cache_seqlens)))
    return attention_out(q)
