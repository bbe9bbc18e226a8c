"""End-to-end decode tokens/s of the SmolVLM-256M decoder: compiled ops vs reference ops.

    python benchmarks/decode_e2e.py [--dtype bfloat16|float32] [--context 1024] [--tokens 24] [--threads 2]

Random weights (VLMConfig.preset("smolvlm-256m")), batch 1: a prefill of --context tokens into
a preallocated KV cache, then single-token decoder forwards (greedy ids fed back). The two
legs run in one process on 2 threads; the reference leg runs under ops.use_reference().
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import idefics3_kit as ik  # noqa: E402
from idefics3_kit import ops  # noqa: E402


def decode_tokens_per_s(decoder, context: int, tokens: int) -> float:
    ids = torch.randint(0, decoder.vocab_size, (1, context))
    cache = decoder.new_cache(1, context + tokens + 1)
    with torch.inference_mode():
        out = decoder(input_ids=ids, cache=cache, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        decoder(input_ids=nxt, cache=cache, logits_to_keep=1)  # warm-up step
        start = time.perf_counter()
        for _ in range(tokens):
            out = decoder(input_ids=nxt, cache=cache, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = ik.VLM(ik.VLMConfig.preset("smolvlm-256m")).to(dtype).eval()
    decoder = model.decoder
    print(f"backend: {ops.backend()}   threads: {torch.get_num_threads()}   load avg: {os.getloadavg()[0]:.1f} (other processes skew 2-thread timings)   dtype: {args.dtype}   "
          f"context: {args.context}   decode tokens: {args.tokens}")
    results = {}
    for leg in ("compiled", "reference", "compiled", "reference"):  # interleaved, best of two
        with ops.use_reference(leg == "reference"):
            tps = decode_tokens_per_s(decoder, args.context, args.tokens)
        results[leg] = max(results.get(leg, 0.0), tps)
    print(f"decode tokens/s: compiled {results['compiled']:.2f}   reference {results['reference']:.2f}   "
          f"ratio x{results['compiled'] / results['reference']:.2f}")


if __name__ == "__main__":
    main()
