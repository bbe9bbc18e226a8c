"""Prometheus text exposition (format 0.0.4), written by hand: no prometheus_client dependency.

Counters, gauges and histograms with optional labels; every update takes one lock because the
engine thread and the event loop both write. ``Metrics`` holds the server's own series.
"""

from __future__ import annotations

import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in labels)
    return "{" + ",".join(escaped) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class _Series:
    kind = ""

    def __init__(self, name: str, help: str, lock: threading.Lock):
        self.name, self.help, self.lock = name, help, lock
        self.values: dict = {}

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Series):
    kind = "counter"

    def inc(self, amount: float = 1, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        with self.lock:
            self.values[tuple(sorted(labels.items()))] = value


class Histogram(_Series):
    kind = "histogram"

    def __init__(self, name: str, help: str, lock: threading.Lock, buckets: tuple):
        super().__init__(name, help, lock)
        self.buckets = tuple(buckets) + (float("inf"),)
        self.values[()] = ([0] * len(self.buckets), 0.0)  # rendered (all zero) before the first observation

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            counts, total = self.values.get(key, ([0] * len(self.buckets), 0.0))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self.values[key] = (counts, total + value)

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, total) in sorted(self.values.items()):
            for bound, count in zip(self.buckets, counts):
                lines.append(f"{self.name}_bucket{_labels(key + (('le', _number(bound)),))} {count}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(key)} {counts[-1]}")
        return lines


class Metrics:
    """The server's series (names prefixed ``idefics3_``); ``render()`` is the /metrics body."""

    def __init__(self):
        lock = threading.Lock()
        p = "idefics3_"
        self.requests = Counter(p + "requests_total", "HTTP requests by route and status code", lock)
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "prompt tokens of admitted requests", lock)
        self.completion_tokens = Counter(p + "completion_tokens_total", "generated tokens", lock)
        self.cancelled = Counter(p + "cancelled_requests_total", "requests cancelled (disconnect or timeout)", lock)
        self.queue_depth = Gauge(p + "queue_depth", "requests waiting for the engine", lock)
        self.running = Gauge(p + "running_rows", "rows in the batch being decoded", lock)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "arrival to first generated token", lock,
                              TTFT_BUCKETS)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "time between a row's generated tokens",
                              lock, TPOT_BUCKETS)
        self.duration = Histogram(p + "request_duration_seconds", "arrival to last token", lock, DURATION_BUCKETS)
        self.batch_size = Histogram(p + "batch_size", "rows joining the running batch together (one prefill)",
                                    lock, BATCH_BUCKETS)
        self.prompt_tokens.inc(0)
        self.completion_tokens.inc(0)
        self.cancelled.inc(0)
        self.queue_depth.set(0)
        self.running.set(0)

    def render(self) -> str:
        series = (self.requests, self.prompt_tokens, self.completion_tokens, self.cancelled, self.queue_depth,
                  self.running, self.ttft, self.tpot, self.duration, self.batch_size)
        lines = []
        for s in series:
            lines += s.render()
        return "\n".join(lines) + "\n"
