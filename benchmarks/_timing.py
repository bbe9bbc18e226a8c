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
