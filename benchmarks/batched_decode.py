"""Batched bf16 decode steps: the compiled few-row kernel on the tile unit vs oneDNN's packed weights.

    python benchmarks/batched_decode.py [--threads 2] [--batches 4 8 16] [--context 128] [--steps 32] [--rounds 3]

SmolVLM-256M decoder shapes, random weights, bf16: a prefill of --context tokens per row, then
--steps one-token steps of the whole batch (greedy ids fed back, each step timed). Two legs in
one process, interleaved round by round, best of --rounds:

- "compiled": what the decoder does now: with AMX, ``decode_linear`` takes up to
  ``ops.matmul.AMX_MAX_ROWS`` rows on the tile unit (csrc/include/idefics3_kit/gemv_amx.h), so
  ``decode_layers`` runs the whole step in one call;
- "oneDNN packed": what it did before for more than ``ops.matmul.MAX_ROWS`` rows: the Python
  layers with oneDNN-packed weights (``ops.prepare_decode``), forced here by capping the
  compiled kernel at MAX_ROWS rows.

Printed per batch: decode tokens/s of each leg (summed over the rows) and their ratio. On a CPU
without AMX both legs run the same code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import idefics3_kit as ik  # noqa: E402
from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops import _library, matmul  # noqa: E402


def decode_rate(decoder, batch: int, context: int, steps: int) -> float:
    """Tokens/s (all rows) of ``steps`` one-token steps after a prefill of ``context`` tokens."""
    ids = torch.randint(0, decoder.vocab_size, (batch, context), generator=torch.Generator().manual_seed(batch))
    cache = decoder.new_cache(batch, context + steps + 1)
    with torch.inference_mode():
        ops.prepare_decode(decoder, batch)  # what generate and the server do before decoding
        nxt = ops.argmax_last(decoder(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1])[:, None]
        start = time.perf_counter()
        for _ in range(steps):
            nxt = ops.argmax_last(decoder(input_ids=nxt, cache=cache, logits_to_keep=1).logits[:, -1])[:, None]
        return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = ik.VLM(ik.VLMConfig.preset("smolvlm-256m")).to(torch.bfloat16).eval().decoder
    legs = {"compiled": lambda b: decode_rate(decoder, b, args.context, args.steps)}

    def packed(b):
        with mock.patch.object(matmul, "max_rows", lambda: matmul.MAX_ROWS):
            return decode_rate(decoder, b, args.context, args.steps)

    legs["oneDNN packed"] = packed
    best: dict = {}
    for r in range(args.rounds):
        names = list(legs) if r % 2 == 0 else list(legs)[::-1]
        for b in args.batches:
            for name in names:
                best[(name, b)] = max(best.get((name, b), 0.0), legs[name](b))
    print(f"SmolVLM-256M decoder, bf16, random weights; {args.threads} threads; context {args.context}, "
          f"{args.steps} steps; AMX-BF16 on this CPU: {_library.cpu_has('amx_bf16')}; best of {args.rounds} "
          "interleaved rounds")
    print(f"{'batch':>5s} {'compiled tok/s':>15s} {'oneDNN packed tok/s':>20s} {'compiled / packed':>18s}")
    for b in args.batches:
        new, old = best[("compiled", b)], best[("oneDNN packed", b)]
        print(f"{b:5d} {new:15.1f} {old:20.1f} {new / old:17.2f}x")


if __name__ == "__main__":
    main()
