"""The vision tower compiled by torch.compile (inductor, freezing) vs our eager tower, side by side.

    python benchmarks/compile_vision.py [--threads 2] [--tiles 2] [--rounds 8] [--dtype bf16] [--preset smolvlm-256m]

Random weights at the preset's vision geometry, --tiles full tiles in one call (2 is the chunk the
CPU tower runs per call on 2 threads, ``VLM.run_vision_tower``). Compiling traces the ordinary
PyTorch code (the fast paths step aside under tracing, ``ops.fast_path``); inductor then brings its
own fusions and kernels. Each round times eager, inductor, inductor, eager; printed: the compile
time, the largest feature difference, every round's eager / inductor ratio and their median, and
the best time of each leg. Issue 20 asked for this measurement before adopting compilation; the
result and its profile are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import idefics3_kit as ik  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiles", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--preset", default="smolvlm-256m")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights as constants: prepacked for oneDNN, folded where possible
    dtype = DTYPES[args.dtype]
    tower = ik.VLM(ik.VLMConfig.preset(args.preset)).to(dtype).eval().vision
    size = tower.config.image_size
    pixels = torch.randn(args.tiles, 3, size, size, dtype=dtype)
    with torch.no_grad():
        compiled = torch.compile(tower)
        compile_s = timed(lambda: compiled(pixels, None))
        eager_out, compiled_out = tower(pixels, None), compiled(pixels, None)
        diff = (eager_out.float() - compiled_out.float()).abs().max().item()
        print(f"{args.preset} tower, {args.tiles} tiles of {size}^2, {args.dtype}, {args.threads} threads: compile + "
              f"first call {compile_s:.1f} s; max |eager - inductor| {diff:.4f} "
              f"(max |feature| {eager_out.float().abs().max().item():.2f})")
        times: dict[str, list[float]] = {"eager": [], "inductor": []}
        ratios = []
        for _ in range(args.rounds):
            legs = [("eager", tower), ("inductor", compiled), ("inductor", compiled), ("eager", tower)]
            spent = {"eager": 0.0, "inductor": 0.0}
            for name, fn in legs:
                seconds = timed(lambda fn=fn: fn(pixels, None))
                times[name].append(seconds)
                spent[name] += seconds
            ratios.append(spent["eager"] / spent["inductor"])
    print("eager / inductor per round: " + " ".join(f"{r:.2f}" for r in ratios)
          + f"   median {statistics.median(ratios):.2f}x")
    print(f"best: eager {min(times['eager']) * 1e3:.0f} ms, inductor {min(times['inductor']) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
