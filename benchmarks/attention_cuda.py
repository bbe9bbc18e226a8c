"""CUDA attention kernels vs torch SDPA (issue 8), measured side by side in one run.

    python benchmarks/attention_cuda.py            # kernel-level table
    python benchmarks/attention_cuda.py --e2e      # + Idefics3-8B-shaped model (random weights):
                                                   #   TTFT and per-token decode, idefics3_kit
                                                   #   (CUDA kernels vs reference ops) vs transformers

Shapes: SigLIP-so400m (17 tiles x 16 heads x 676 tokens x hd72, non-causal), Llama-3 prefill
(4k tokens, causal, hd128, GQA 32:8), decode (8k context, hd128, GQA 32:8, batch 1 and 8; GB/s of
K+V read). Timing: CUDA events, median of --iters after warm-up. Prints a note and exits 0 on a
machine without CUDA or without the kernels. No GPU number has been measured yet (docs/cuda.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _time(fn, iters: int) -> float:
    """Median seconds per call (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def kernel_table(iters: int) -> None:
    ops = torch.ops.idefics3_kit
    dt = torch.bfloat16
    rows = []

    # SigLIP encoder attention
    b, h, l, d = 17, 16, 676, 72
    q, k, v = (torch.randn(b, h, l, d, device="cuda", dtype=dt) for _ in range(3))
    flops = 4 * b * h * l * l * d
    t_k = _time(lambda: ops.vision_attention(q, k, v, None, d ** -0.5), iters)
    t_s = _time(lambda: F.scaled_dot_product_attention(q, k, v), iters)
    rows.append(("vision 17x16x676 hd72", t_k, t_s, f"{flops / t_k / 1e12:.0f} vs {flops / t_s / 1e12:.0f} TFLOP/s"))
    kpm = torch.ones(b, l, dtype=torch.bool, device="cuda")
    kpm[-1, 400:] = False
    t_k = _time(lambda: ops.vision_attention(q, k, v, kpm, d ** -0.5), iters)
    t_s = _time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=kpm[:, None, None, :]), iters)
    rows.append(("vision + key mask", t_k, t_s, ""))

    # prefill
    b, hq, hkv, l, d = 1, 32, 8, 4096, 128
    q = torch.randn(b, hq, l, d, device="cuda", dtype=dt)
    k, v = (torch.randn(b, hkv, l, d, device="cuda", dtype=dt) for _ in range(2))
    flops = 2 * b * hq * l * l * d  # causal: half of 4·B·H·L²·D
    t_k = _time(lambda: ops.prefill_attention(q, k, v, None, d ** -0.5), iters)
    t_s = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), iters)
    rows.append(("prefill 4k causal hd128 32:8", t_k, t_s,
                 f"{flops / t_k / 1e12:.0f} vs {flops / t_s / 1e12:.0f} TFLOP/s"))

    # decode
    for b in (1, 8):
        ctx = 8192
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=dt)
        k, v = (torch.randn(b, hkv, ctx, d, device="cuda", dtype=dt) for _ in range(2))
        nbytes = 2 * b * hkv * ctx * d * 2  # K + V, bf16
        t_k = _time(lambda: ops.decode_attention(q, k, v, None, None, d ** -0.5), iters)
        t_s = _time(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters)
        rows.append((f"decode 8k ctx b{b} hd128 32:8", t_k, t_s,
                     f"{nbytes / t_k / 1e9:.0f} vs {nbytes / t_s / 1e9:.0f} GB/s"))

    print(f"{'case':34s} {'kernel ms':>10s} {'sdpa ms':>10s} {'speed-up':>9s}  rate (kernel vs sdpa)")
    for name, tk, ts, rate in rows:
        print(f"{name:34s} {tk * 1e3:10.3f} {ts * 1e3:10.3f} {ts / tk:8.2f}x  {rate}")


def e2e(iters: int, prompt_tokens: int) -> None:
    """TTFT (one 1600x900 image = 17 tiles + text) and one decode step of Idefics3-8B-shaped models
    (random weights; no checkpoint needed)."""
    from idefics3_kit.config import VLMConfig
    from idefics3_kit.model import VLM
    from idefics3_kit.ops import use_reference

    cfg = VLMConfig.preset("idefics3-8b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VLM(cfg).to(torch.bfloat16).eval()
    tiles = 17
    img_tokens = tiles * model.image_seq_len
    n = max(prompt_tokens, img_tokens + 16)
    ids = torch.randint(0, 128000, (1, n), device="cuda")
    ids[0, 8: 8 + img_tokens] = model.image_token_id
    pv = torch.randn(1, tiles, 3, 364, 364, device="cuda", dtype=torch.bfloat16)
    pm = torch.ones(1, tiles, 364, 364, device="cuda", dtype=torch.bool)
    rows = []

    def ik_times():
        def ttft():
            with torch.no_grad():
                model(input_ids=ids, pixel_values=pv, pixel_attention_mask=pm, logits_to_keep=1)

        cache = model.decoder.new_cache(1, n + 8)
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv, pixel_attention_mask=pm, cache=cache, logits_to_keep=1)
        step_ids = ids[:, -1:]

        def step():
            with torch.no_grad():
                model(input_ids=step_ids, cache=cache, logits_to_keep=1)
            cache.length -= 1  # rewind: every step sees the same n-token context

        return _time(ttft, iters), _time(step, iters * 5)

    rows.append(("idefics3_kit + CUDA kernels", *ik_times()))
    with use_reference():
        rows.append(("idefics3_kit reference ops", *ik_times()))
    del model
    torch.cuda.empty_cache()
    try:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        hf_cfg = Idefics3Config(**cfg.to_hf_dict())
        with torch.device("cuda"):
            hf = Idefics3ForConditionalGeneration(hf_cfg).to(torch.bfloat16).eval()

        def hf_ttft():
            with torch.no_grad():
                hf(input_ids=ids, pixel_values=pv, pixel_attention_mask=pm, logits_to_keep=1)

        with torch.no_grad():
            out = hf(input_ids=ids, pixel_values=pv, pixel_attention_mask=pm, use_cache=True, logits_to_keep=1)
        past = out.past_key_values

        def hf_step():
            with torch.no_grad():
                hf(input_ids=ids[:, -1:], past_key_values=past, use_cache=True, logits_to_keep=1)
            past.crop(n)

        rows.append(("transformers (sdpa)", _time(hf_ttft, iters), _time(hf_step, iters * 5)))
    except Exception as exc:  # transformers is a test-only dependency
        print(f"(transformers baseline skipped: {type(exc).__name__}: {exc})")
    print(f"\nIdefics3-8B shapes, random weights, 1 image (17 tiles) + {n} prompt tokens, bf16")
    print(f"{'path':34s} {'TTFT ms':>10s} {'decode ms/token':>16s}")
    for name, t_first, t_step in rows:
        print(f"{name:34s} {t_first * 1e3:10.1f} {t_step * 1e3:16.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=2600)
    args = ap.parse_args(argv)
    from idefics3_kit.ops import _library

    if not torch.cuda.is_available() or not _library.has_kernel("vision_attention", "cuda"):
        print("attention_cuda: no CUDA device or no CUDA attention kernels; nothing to measure")
        return 0
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name} ({p.multi_processor_count} SMs)")
    kernel_table(args.iters)
    if args.e2e:
        e2e(max(3, args.iters // 10), args.prompt_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
