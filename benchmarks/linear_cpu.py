"""The decode step's compiled pieces vs what they replace, side by side (2 threads).

    python benchmarks/linear_cpu.py [--threads N]

- decode_linear (one row, bf16) vs torch's two bf16 paths: oneDNN with a prepacked weight
  (what the decoder used before) and plain F.linear, at SmolVLM-256M's projection shapes. Each
  leg cycles through 30 distinct weights per shape, as a decode step does through its 30 layers,
  so the weights come from L3/memory and not from L2.
- rms_norm (compiled, bf16) vs the reference formula (F.rms_norm + casts) on one row.
- the activation epilogues of the many-row linears (ops/dense_linear.py), float32: the SigLIP fc1
  (1024 x 768 @ 768 x 3072, tanh GELU) and the decoder's gate (892 x 576 @ 576 x 1536, SiLU), fused
  into oneDNN's matmul vs the matmul then torch's activation; the library fuses only where
  ``dense_linear.epilogue_activations()`` says so.
- decode_layers (one call for all 30 layers) vs the Python layers, one decode step at 128
  cached tokens; in bf16 also the Python layers as they ran before these ops (oneDNN packed
  weights, F.rms_norm): the whole per-step saving.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _timing import compare, set_threads_from_argv  # noqa: E402

import idefics3_kit as ik  # noqa: E402
from idefics3_kit import ops  # noqa: E402
from idefics3_kit.components import decoder as D  # noqa: E402
from idefics3_kit.ops import dense_linear  # noqa: E402

SHAPES = {"q|k|v": [(576, 576), (192, 576), (192, 576)], "o_proj": [(576, 576)],
          "gate|up": [(1536, 576), (1536, 576)], "down_proj": [(576, 1536)], "lm_head": [(49280, 576)]}


def cycling(fns):
    """A zero-argument callable that runs the next of ``fns`` on each call."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()
    return run


def linear_case(name, shapes):
    copies = 1 if name == "lm_head" else 30
    k = shapes[0][1]
    x = torch.randn(1, 1, k, dtype=torch.bfloat16)
    sets = [[torch.randn(n, k, dtype=torch.bfloat16) for n, _ in shapes] for _ in range(copies)]
    cat = [torch.cat(ws) for ws in sets]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in cat]
    t = compare({
        "ours": cycling([lambda ws=ws: torch.ops.idefics3_kit.decode_linear(x, ws, [None] * len(ws)) for ws in sets]),
        "onednn": cycling([lambda p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]),
        "F.linear": cycling([lambda w=w: F.linear(x, w) for w in cat]),
    }, repeats=200, warmup=20)
    gbs = {leg: cat[0].numel() * 2 / seconds / 1e9 for leg, seconds in t.items()}
    print(f"decode_linear {name:9s} {cat[0].shape[0]:5d}x{k:4d}: ours {t['ours'] * 1e6:7.1f} us ({gbs['ours']:4.1f} GB/s)  "
          f"oneDNN packed {t['onednn'] * 1e6:7.1f} us ({gbs['onednn']:4.1f} GB/s)  x{t['onednn'] / t['ours']:.2f}   "
          f"F.linear {t['F.linear'] * 1e6:7.1f} us  x{t['F.linear'] / t['ours']:.2f}")


def rms_norm_case(dtype):
    x = torch.randn(1, 1, 576, dtype=dtype)
    w = torch.randn(576, dtype=dtype)
    t = compare({"ours": lambda: torch.ops.idefics3_kit.rms_norm(x, w, 1e-5),
                 "reference": lambda: ops.rms_norm_ref(x, w, 1e-5)}, repeats=2000, warmup=50)
    print(f"rms_norm {str(dtype):15s} 1 x 576: ours {t['ours'] * 1e6:5.1f} us  reference {t['reference'] * 1e6:5.1f} us  "
          f"x{t['reference'] / t['ours']:.2f}")


def epilogue_case(name, rows, k, n, post_op, algorithm, activation):
    x, w, b = torch.randn(rows, k), torch.randn(n, k) * 0.02, torch.randn(n) * 0.02
    lin = torch.ops.mkldnn._linear_pointwise
    t = compare({"fused": lambda: lin(x, w, b, post_op, [], algorithm),
                 "separate": lambda: activation(lin(x, w, b, "none", [], ""))}, repeats=15, warmup=2)
    used = "fused" if dense_linear.epilogue_activations() else "separate"
    print(f"epilogue {name:16s} {rows}x{k} @ {k}x{n}: fused {t['fused'] * 1e3:6.1f} ms  separate {t['separate'] * 1e3:6.1f} ms  "
          f"fused/separate x{t['fused'] / t['separate']:.2f}   the library runs: {used}")


def decode_step_case(dtype):
    """One decode step three ways: decode_layers; the Python layers (with decode_linear and
    rms_norm); and, in bf16, the Python layers as before those ops (oneDNN packed weights,
    F.rms_norm)."""
    from idefics3_kit.ops import matmul, norm as norm_ops

    torch.manual_seed(0)
    decoder = ik.VLM(ik.VLMConfig.preset("smolvlm-256m")).to(dtype).eval().decoder
    cache = decoder.new_cache(1, 200)
    ids = torch.randint(0, decoder.vocab_size, (1, 128))
    nxt = ids[:, :1]
    one_call = D.CausalDecoder._one_call_step

    def step():
        decoder(input_ids=nxt, cache=cache, logits_to_keep=1)
        cache.length -= 1  # stay at 128 cached tokens

    def python_step():
        D.CausalDecoder._one_call_step = lambda self, *a: None
        try:
            step()
        finally:
            D.CausalDecoder._one_call_step = one_call

    def before_step():  # no decode_linear (MAX_ROWS 0), torch's RMSNorm, oneDNN packed weights
        rows, compiled_norm = matmul.MAX_ROWS, ops.rms_norm
        matmul.MAX_ROWS, ops.rms_norm = 0, norm_ops.rms_norm_ref
        try:
            python_step()
        finally:
            matmul.MAX_ROWS, ops.rms_norm = rows, compiled_norm

    legs = {"ours": step, "python": python_step}
    os.environ["IDEFICS3_KIT_PREPACK"] = "1"  # packed copies for the "before" leg (made on its first use)
    if dtype == torch.bfloat16 and matmul.prepare_decode(decoder, 1):
        legs["before"] = before_step
    with torch.inference_mode():
        decoder(input_ids=ids, cache=cache)
        t = compare(legs, repeats=30, warmup=3)
    before = f"  before these ops {t['before'] * 1e3:6.2f} ms  x{t['before'] / t['ours']:.2f}" if "before" in t else ""
    print(f"decode step {str(dtype):15s} (30 layers + LM head, 128 cached): decode_layers {t['ours'] * 1e3:6.2f} ms  "
          f"Python layers {t['python'] * 1e3:6.2f} ms  x{t['python'] / t['ours']:.2f}{before}")


def main() -> None:
    set_threads_from_argv()
    print(f"backend: {ops.backend()}   threads: {torch.get_num_threads()}   load avg: {os.getloadavg()[0]:.1f}   "
          f"avx512_bf16: {ops._library.cpu_has('avx512_bf16')}")
    if not ops.has_extension():
        print("the compiled extension is not built: nothing to compare")
        return
    with torch.inference_mode():
        for name, shapes in SHAPES.items():
            linear_case(name, shapes)
        rms_norm_case(torch.bfloat16)  # the library runs the compiled norm for bf16 only
        epilogue_case("fc1 + tanh GELU", 1024, 768, 3072, "gelu", "tanh", lambda y: F.gelu(y, approximate="tanh"))
        epilogue_case("gate + SiLU", 892, 576, 1536, "swish", "", lambda y: F.silu(y, inplace=True))
    for dtype in (torch.float32, torch.bfloat16):
        decode_step_case(dtype)


if __name__ == "__main__":
    main()
