"""Side-by-side timing helpers for the benchmarks (interleaved legs, medians)."""

from __future__ import annotations

import statistics
import time


def compare(legs: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds of each zero-argument callable, the legs interleaved round by round so
    that load from other processes hits them alike."""
    for fn in legs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in legs}
    for _ in range(repeats):
        for name, fn in legs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def set_threads_from_argv(default: int = 2) -> int:
    """torch threads from ``--threads N`` (default 2, the CI machine's size). On a machine shared
    with other work a 1-thread run shows the per-core speed without waits for a descheduled
    second thread."""
    import sys

    import torch

    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else default
    torch.set_num_threads(threads)
    return threads
