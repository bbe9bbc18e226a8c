"""Greedy decoding's argmax over the vocabulary: torch.argmax, the blocked ATen composition
(ops.reduce.argmax_blocked, what runs without the extension) and ops.argmax_last (the compiled op
where it applies), side by side.

    python benchmarks/argmax.py [--vocab 49280] [--rows 1 8] [--threads 1 2]

Prints the median microseconds of each (interleaved, 300 calls per measure) and torch's time over
ours. These are hot-cache times; inside a decode step, whose weight stream evicts the ops'
metadata, the blocked composition cost ~115 us and the compiled op a few.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops import reduce  # noqa: E402


def micros(fn, calls: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49280)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"vocabulary {args.vocab}; median of {args.repeats} interleaved measures, microseconds per call")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(rows, args.vocab).to(dtype)
                assert torch.equal(ops.argmax_last(x), x.argmax(dim=-1))
                plain, blocked, ours = [], [], []
                for _ in range(args.repeats):
                    plain.append(micros(lambda: x.argmax(dim=-1)))
                    blocked.append(micros(lambda: reduce.argmax_blocked(x)))
                    ours.append(micros(lambda: ops.argmax_last(x)))
                a, m, b = statistics.median(plain), statistics.median(blocked), statistics.median(ours)
                print(f"threads {threads}  rows {rows}  {str(dtype).removeprefix('torch.'):8s}  torch.argmax {a:8.1f}"
                      f"  blocked {m:7.1f}  ops.argmax_last {b:7.1f}  {a / b:6.2f}x")


if __name__ == "__main__":
    main()
