"""SigLIP's fc1 with its tanh GELU, four ways, side by side: the linear alone (oneDNN), the GELU in
oneDNN's epilogue, the linear then torch's bf16 F.gelu, and the linear then our in-place pass
(ops.gelu_tanh_); also each GELU pass alone on the linear's output.

    python benchmarks/activation.py [--rows 2048] [--threads 2] [--dtype bf16|fp32]

Shapes: [rows x 768] @ [768 x 3072] (SmolVLM-256M's SigLIP; the CPU tower runs 2 tiles = 2048 rows
a call). Medians of interleaved rounds, milliseconds. ops.dense takes the pass where
``dense_linear.gelu_pass()`` says (AVX-512 CPUs without AMX: measured on an AMD Zen 4), and on
AVX2-only CPUs (bf16 as float32, the GELU after the linear: measure them with --dtype fp32).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import compare  # noqa: E402

from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops import _library, dense_linear  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--k", type=int, default=768)
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if not ops.has_extension():
        raise SystemExit(f"the compiled extension is not built: {ops.extension_error()}")
    if dtype == torch.bfloat16 and not _library.onednn_bf16():
        raise SystemExit("oneDNN has no bf16 matmul on this CPU (no AVX-512): the bf16 tower runs as float32 "
                         "here, so measure with --dtype fp32")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.k, generator=g).to(dtype)
    w = (torch.randn(args.n, args.k, generator=g) / args.k ** 0.5).to(dtype)
    b = torch.randn(args.n, generator=g).to(dtype)
    linear = torch.ops.mkldnn._linear_pointwise
    y = linear(x, w, b, "none", [], "")
    scratch = y.clone()
    legs = {
        "linear": lambda: linear(x, w, b, "none", [], ""),
        "linear + epilogue GELU": lambda: linear(x, w, b, "gelu", [], "tanh"),
        "linear + torch F.gelu": lambda: F.gelu(linear(x, w, b, "none", [], ""), approximate="tanh"),
        "linear + ops.gelu_tanh_": lambda: ops.gelu_tanh_(linear(x, w, b, "none", [], "")),
        "torch F.gelu alone": lambda: F.gelu(y, approximate="tanh"),
        "ops.gelu_tanh_ alone": lambda: ops.gelu_tanh_(scratch.copy_(y)),
        "copy alone (subtract from the above)": lambda: scratch.copy_(y),
    }
    times = compare(legs, repeats=args.repeats)
    print(f"[{args.rows} x {args.k}] @ [{args.k} x {args.n}] {args.dtype}, {args.threads} threads; "
          f"gelu_pass() here: {dense_linear.gelu_pass()}; medians, ms")
    for name, seconds in times.items():
        print(f"  {name:38s} {seconds * 1e3:8.3f}")
    base = times["linear"]
    print(f"  GELU's cost over the linear: epilogue {1e3 * (times['linear + epilogue GELU'] - base):.3f} ms, "
          f"torch {1e3 * (times['linear + torch F.gelu'] - base):.3f} ms, "
          f"ours {1e3 * (times['linear + ops.gelu_tanh_'] - base):.3f} ms")


if __name__ == "__main__":
    main()
