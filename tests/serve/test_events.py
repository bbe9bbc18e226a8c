"""How tokens travel from the engine's thread to the streams: one hand-off per decode step, and a
stream that runs behind sends the waiting text of a choice as one chunk (the same text)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import types

import pytest

pytest.importorskip("fastapi")

from idefics3_kit.serve.app import _Reply  # noqa: E402
from idefics3_kit.serve.engine import Job, flush_events  # noqa: E402


def job(loop, n: int = 1) -> Job:
    return Job(inputs=None, params=types.SimpleNamespace(n=n), max_new=8, loop=loop, deadline=1e18)


class CountingLoop:
    """Stands in for an event loop: counts the wake-ups and runs what was handed over at once."""

    def __init__(self):
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        fn(*args)


def test_a_step_s_events_reach_every_stream_in_one_wake_up():
    loop = CountingLoop()
    jobs = [job(loop) for _ in range(8)]
    buffer: list = []
    for j in jobs:
        j.buffer = buffer
        j.emit("delta", 0, "a")
        j.emit("delta", 0, "b")
    assert loop.calls == 0
    flush_events(buffer)
    assert loop.calls == 1 and buffer == []
    assert all([j.events.get_nowait(), j.events.get_nowait()] == [("delta", 0, "a"), ("delta", 0, "b")] for j in jobs)


def test_without_a_batch_an_event_goes_at_once():
    loop = CountingLoop()
    j = job(loop)
    j.emit("finish", 0, "stop")
    assert loop.calls == 1 and j.events.get_nowait() == ("finish", 0, "stop")


def test_a_stream_behind_the_engine_merges_waiting_deltas_of_one_choice():
    async def main():
        j = job(asyncio.get_running_loop(), n=2)
        chat = types.SimpleNamespace(params=types.SimpleNamespace(n=2), include_usage=False)
        reply = _Reply("m", chat, j)
        for event in [("delta", 0, "Hel"), ("delta", 0, "lo"), ("delta", 1, "x"), ("delta", 0, "!"),
                      ("finish", 0, "stop"), ("finish", 1, "length"), ("done", {"total_tokens": 3})]:
            j.events.put_nowait(event)
        return [chunk async for chunk in reply.stream()]

    chunks = [json.loads(c[len("data: "):]) for c in asyncio.run(main()) if c != "data: [DONE]\n\n"]
    deltas = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content")) for c in chunks[2:]]
    assert deltas == [(0, "Hello"), (1, "x"), (0, "!"), (0, None), (1, None)]


# ---- gathering a batch ------------------------------------------------------------------------

def _gatherer(window_ms: float, max_batch: int = 8):
    """An Engine with only what _gather reads (no model)."""
    from idefics3_kit.serve.engine import Engine
    from idefics3_kit.serve.metrics import Metrics
    from idefics3_kit.serve.settings import ServeSettings

    engine = Engine.__new__(Engine)
    engine.settings = ServeSettings(max_batch_size=max_batch, batch_window_ms=window_ms)
    engine.queue, engine.carry, engine.metrics = queue.Queue(), None, Metrics()
    engine.preparing, engine._preparing_lock = 0, threading.Lock()
    return engine


def _feed(engine, jobs, gap_s: float, preparing: bool = True) -> threading.Thread:
    """Submit ``jobs`` ``gap_s`` apart; with ``preparing``, each is announced as being prepared (as
    the app does while it reads and preprocesses a request) from the moment the previous one lands."""
    def run():
        for j in jobs:
            if preparing:
                with engine.preparing_request():
                    time.sleep(gap_s)
                    engine.queue.put(j)
            else:
                time.sleep(gap_s)
                engine.queue.put(j)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_requests_arriving_one_after_another_join_one_batch():
    """Clients answered together come back one request-parse apart: while a request is being
    prepared the window stays open, so the third request (750 ms after the first was announced,
    past one 400 ms window) still joins."""
    engine = _gatherer(400)
    jobs = [job(None) for _ in range(3)]
    feeder = _feed(engine, jobs, 0.25)
    assert engine._gather() == jobs
    feeder.join()


def test_gathering_does_not_wait_out_the_window_when_nothing_is_coming():
    """With no request being prepared, a batch closes after a short grace, not the whole window:
    a request that lands later than that starts the next batch."""
    engine = _gatherer(2000)
    first, late = job(None), job(None)
    engine.queue.put(first)
    feeder = _feed(engine, [late], 2.0, preparing=False)
    start = time.monotonic()
    assert engine._gather() == [first]
    assert time.monotonic() - start < 1.9  # the grace is a fifth of the 2 s window (0.4 s)
    feeder.join()
    assert engine._gather() == [late]


def test_gathering_waits_for_a_request_being_prepared_at_most_the_window_cap():
    """A request announced as being prepared keeps the batch open, but never past MAX_WINDOWS windows."""
    from idefics3_kit.serve.engine import MAX_WINDOWS

    engine = _gatherer(50)
    first = job(None)
    engine.queue.put(first)
    with engine.preparing_request():  # announced, never submitted (e.g. a request that fails to parse)
        start = time.monotonic()
        assert engine._gather() == [first]
        waited = time.monotonic() - start
    assert MAX_WINDOWS * 0.05 - 0.01 <= waited < MAX_WINDOWS * 0.05 + 2.0
    assert engine.preparing == 0


def test_gathering_ends_at_the_batch_size_and_carries_the_rest():
    engine = _gatherer(400, max_batch=2)
    jobs = [job(None) for _ in range(3)]
    for j in jobs:
        engine.queue.put(j)
    assert engine._gather() == jobs[:2]
    assert engine._gather() == jobs[2:]
