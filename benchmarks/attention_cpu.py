"""CPU attention kernels vs torch.nn.functional.scaled_dot_product_attention, side by side.

    python benchmarks/attention_cpu.py

2 threads; legs interleaved; medians. Decode reads k/v as views of a preallocated cache (as
the model does); vision uses SigLIP tile shapes; the dispatch line shows what ops.attention
runs for that case (vision goes to torch's kernel by policy except where the AMX kernel or, for bf16
on an AVX-512 BF16 CPU without AMX, the blocked kernel takes it: see ops/attention.py).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import compare, set_threads_from_argv  # noqa: E402

from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops.attention import attention_sdpa  # noqa: E402


def decode_case(dtype, hq, hkv, d, ctx, lmax=4608):
    k_cache = torch.randn(1, hkv, lmax, d, dtype=dtype)
    v_cache = torch.randn(1, hkv, lmax, d, dtype=dtype)
    k, v = k_cache[:, :, :ctx], v_cache[:, :, :ctx]
    q = torch.randn(1, hq, 1, d, dtype=dtype)
    scale = d ** -0.5
    legs = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
        "ours": lambda: torch.ops.idefics3_kit.decode_attention(q, k, v, None, None, scale),
    }
    stream = None
    if dtype == torch.bfloat16 and hasattr(torch.ops.idefics3_kit, "decode_linear"):
        # The floor: reading the same K and V bytes once with the best streaming loop we have (the
        # one-row linear kernel over the rows of each head's keys and values; no attention math).
        rows = [t[0, h] for t in (k_cache, v_cache) for h in range(hkv)]
        x = torch.randn(1, d, dtype=dtype)
        stream = [r[:ctx] for r in rows]
        legs["read K+V once"] = lambda: torch.ops.idefics3_kit.decode_linear(x, stream, [None] * len(stream))
    t = compare(legs, repeats=15)
    gbs = 2 * k.numel() * k.element_size() / t["ours"] / 1e9
    floor = ""
    if stream is not None:
        floor = (f"  [read K+V once: {t['read K+V once'] * 1e3:5.2f} ms, so at most "
                 f"x{t['sdpa'] / t['read K+V once']:.2f} over sdpa here]")
    print(f"decode  {str(dtype):15s} Hq {hq:2d} / Hkv {hkv} hd {d:3d} ctx {ctx}: sdpa {t['sdpa'] * 1e3:6.2f} ms  "
          f"ours {t['ours'] * 1e3:6.2f} ms ({gbs:4.1f} GB/s of KV)  speedup x{t['sdpa'] / t['ours']:.2f}{floor}")


def vision_case(dtype, heads, length, d, masked=False):
    q, k, v = (torch.randn(1, heads, length, d, dtype=dtype) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(1, length, dtype=torch.bool)
        mask[:, -length // 4:] = False
    bool_mask = None if mask is None else mask[:, None, None, :]
    scale = d ** -0.5
    t = compare({
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=scale),
        "ours": lambda: torch.ops.idefics3_kit.vision_attention(q, k, v, mask, scale),
        "dispatch": lambda: ops.attention(q, k, v, key_padding_mask=mask),
    }, repeats=7)
    print(f"vision  {str(dtype):15s} {heads} heads x {length} x hd {d}{' masked' if masked else '       '}: "
          f"sdpa {t['sdpa'] * 1e3:6.2f} ms  ours {t['ours'] * 1e3:6.2f} ms  speedup x{t['sdpa'] / t['ours']:.2f}  "
          f"(ops.attention x{t['sdpa'] / t['dispatch']:.2f})")


def prefill_case(dtype, b, hq, hkv, length, d, masked=False):
    # Projections as the decoder makes them: [B, L, H, D] memory viewed as [B, H, L, D].
    q = torch.randn(b, length, hq, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, length, hkv, d, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, length, hkv, d, dtype=dtype).transpose(1, 2)
    mask = None
    if masked:  # left padding of the last sequence
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[-1, : length // 5] = False
    t = compare({
        "sdpa": lambda: attention_sdpa(q, k, v, causal=True, key_padding_mask=mask),
        "ours": lambda: torch.ops.idefics3_kit.prefill_attention(q, k, v, mask, d ** -0.5),
    }, repeats=5)
    print(f"prefill {str(dtype):15s} B {b} Hq {hq:2d} / Hkv {hkv} hd {d:3d} L {length}{' left-pad' if masked else '         '}: "
          f"sdpa {t['sdpa'] * 1e3:6.2f} ms  ours {t['ours'] * 1e3:6.2f} ms  speedup x{t['sdpa'] / t['ours']:.2f}")


def main() -> None:
    set_threads_from_argv()
    print(f"backend: {ops.backend()}   threads: {torch.get_num_threads()}   load avg: {os.getloadavg()[0]:.1f} (other processes skew 2-thread timings)   "
          f"cpu: {torch.backends.cpu.get_cpu_capability()}")
    for d in (64, 128):
        decode_case(torch.bfloat16, 32, 8, d, 4096)
    decode_case(torch.float32, 32, 8, 128, 4096)
    for dtype in (torch.float32, torch.bfloat16):
        prefill_case(dtype, 1, 9, 3, 1024, 64)
        prefill_case(dtype, 2, 9, 3, 512, 64, masked=True)
        prefill_case(dtype, 1, 32, 8, 1024, 128)
    for dtype in (torch.float32, torch.bfloat16):
        vision_case(dtype, 16, 676, 72)
        vision_case(dtype, 12, 1024, 64)
        vision_case(dtype, 16, 676, 72, masked=True)


if __name__ == "__main__":
    main()
