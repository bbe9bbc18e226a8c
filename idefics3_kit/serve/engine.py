"""The batching engine: one worker thread runs the model; requests decode together.

Continuous batching (serve/batch.py): the rows being decoded form one running batch; between two
decode steps the worker admits the requests that arrived (prefilled on their own, then joined,
up to ``max_batch_size`` rows; a request with ``n`` choices takes ``n`` rows) and drops the rows
that finished, so a request never waits for a batch to end and a finished row frees its slot at
once. When nothing is decoding the worker waits for a request, then up to ``batch_window_ms``
for more, each arrival keeping the window open for another ``batch_window_ms`` (at most
``MAX_WINDOWS`` windows in all: clients answered together come back one request-parse apart, and
a fixed window split them into two or three batches). Each row has its own sampler
(temperature, top_p, top_k, seed: one generator per row), its own token budget and stop strings,
and finishes on its own. A cancelled row (client gone, timeout) stops streaming at once and
leaves the batch at the next step.

Results go back to each request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``:
``("delta", choice, text)``, ``("finish", choice, reason)``, ``("done", usage)`` or ``("error", APIError)``;
a step's events go in one hand-off per event loop (``flush_events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time

import torch

from ..components.sampler import build_chain
from ..generation import resolve_settings
from ..streaming import IncrementalDetokenizer
from .batch import RunningBatch
from .errors import APIError
from .metrics import Metrics
from .requests import PreparedInputs, SamplingParams
from .settings import ServeSettings


MAX_WINDOWS = 4  # the most a batch's gathering waits: this many windows after its first request
GRACE_FRACTION = 5  # with no request being prepared, gathering waits a fifth of the window for one more
GRACE_POLL_S = 0.001  # how often gathering looks again while a request is being prepared


class Job:
    """One admitted request: its processed prompt, settings, and the queue its results go to."""

    def __init__(self, inputs: PreparedInputs, params: SamplingParams, max_new: int, loop, deadline: float):
        self.inputs, self.params, self.max_new = inputs, params, max_new
        self.loop, self.deadline = loop, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.monotonic()
        self.cancelled = False  # set from the event loop; read by the worker at every step
        self.done = False
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.open_rows = params.n
        self.buffer: list | None = None  # during a batch: events wait here for the step's flush_events

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, *event) -> None:
        if self.buffer is not None:
            self.buffer.append((self, event))
            return
        _call_in_loop(self.loop, _deliver, [(self, event)])


def _deliver(items: list) -> None:
    for job, event in items:
        job.events.put_nowait(event)


def _call_in_loop(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
        pass


def flush_events(buffer: list) -> None:
    """Hand a decode step's events to their event loops, one call per loop: one wake-up per step
    instead of one per token per stream (with small models the wake-ups cost more than the step)."""
    by_loop: dict = {}
    for job, event in buffer:
        by_loop.setdefault(job.loop, []).append((job, event))
    buffer.clear()
    for loop, items in by_loop.items():
        _call_in_loop(loop, _deliver, items)


class Row:
    """One choice of one job inside a batch: its sampler, detokenizer, stop strings and budget."""

    def __init__(self, job: Job, choice: int, tokenizer, eos_ids: set, defaults: dict):
        self.job, self.choice = job, choice
        self.eos_ids = set() if job.params.ignore_eos else eos_ids
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.text, self.sent, self.tokens = "", 0, 0
        self.finished = False
        self.last_time: float | None = None
        p = job.params
        temperature = p.temperature if p.temperature is not None else defaults.get("temperature", 1.0)
        do_sample = bool(defaults.get("do_sample", False)) if p.temperature is None else p.temperature > 0
        self.chain = build_chain(do_sample=do_sample, temperature=temperature,
                                 top_k=p.top_k if p.top_k is not None else defaults.get("top_k"),
                                 top_p=p.top_p if p.top_p is not None else defaults.get("top_p"),
                                 min_p=p.min_p, repetition_penalty=p.repetition_penalty)
        self.greedy = not do_sample and not self.chain.processors
        seed = (p.seed + choice) % 2 ** 63 if p.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def push(self, token: int, now: float, metrics: Metrics) -> None:
        """Take the row's next token: stream its text, finish on eos, a stop string or the budget."""
        job = self.job
        self.tokens += 1
        job.completion_tokens += 1
        if job.first_token_at is None:
            job.first_token_at = now
            metrics.ttft.observe(now - job.arrival)
        if self.last_time is not None:
            metrics.tpot.observe(now - self.last_time)
        self.last_time = now
        if token in self.eos_ids:
            self.finish("stop")
            return
        self.text += self.detok.push(token)
        if not self._stream_text(final=False):
            self.finish("stop")
        elif self.tokens >= job.max_new:
            self.finish("length")

    def _stream_text(self, final: bool) -> bool:
        """Send the text that is safe to send; False when a stop string was found (text cut before it)."""
        stops = self.job.params.stop
        hit = _first_stop(self.text, stops, self.sent)
        if hit is not None:
            self.text = self.text[:hit]
        end = len(self.text) if final or hit is not None else len(self.text) - _held_back(self.text, stops)
        if end > self.sent:
            self.job.emit("delta", self.choice, self.text[self.sent:end])
            self.sent = end
        return hit is None

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        if reason != "cancelled":
            self.text += self.detok.flush()
            if not self._stream_text(final=True):
                reason = "stop"
            self.job.emit("finish", self.choice, reason)
        self.job.open_rows -= 1


def _first_stop(text: str, stops: tuple, sent: int) -> int | None:
    """Where the earliest stop string starts (searched from just before the unsent text)."""
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple) -> int:
    """How many trailing characters could begin a stop string (they wait for the next piece)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def collate(inputs: list[PreparedInputs], pad_id: int) -> dict:
    """Left-pad prompts [1, L_i] into [B, L]; pad image tiles with all-zero tiles (the model drops them)."""
    length = max(x.prompt_tokens for x in inputs)
    ids = torch.full((len(inputs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), length), dtype=torch.long)
    for i, x in enumerate(inputs):
        ids[i, length - x.prompt_tokens:] = x.input_ids[0]
        mask[i, length - x.prompt_tokens:] = x.attention_mask[0]
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": None, "pixel_attention_mask": None}
    images = [(i, x.pixel_values, x.pixel_attention_mask) for i, x in enumerate(inputs) if x.pixel_values is not None]
    if images:
        tiles = max(pv.shape[1] for _, pv, _ in images)
        _, first, _ = images[0]
        size = first.shape[-1]
        pixels = torch.zeros((len(inputs), tiles, *first.shape[2:]), dtype=first.dtype)  # [B, T_max, 3, S, S]
        pmask = torch.zeros((len(inputs), tiles, size, size), dtype=torch.long)  # [B, T_max, S, S]
        for i, pv, pm in images:
            pixels[i, :pv.shape[1]] = pv[0]
            pmask[i, :pv.shape[1]] = 1 if pm is None else pm[0]
        batch["pixel_values"], batch["pixel_attention_mask"] = pixels, pmask
    return batch


class Engine:
    """The worker thread and its bounded queue (see the module docstring)."""

    def __init__(self, model, processor, settings: ServeSettings, metrics: Metrics):
        self.model, self.processor, self.settings, self.metrics = model, processor, settings, metrics
        self.context = model.config.decoder.max_position_embeddings
        gen = resolve_settings(model.generation_config, model.decoder.config)
        self.eos_ids = tuple(gen.eos_token_ids)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else 0
        self.defaults = {k: v for k, v in dict(model.generation_config).items()
                         if k in ("do_sample", "temperature", "top_k", "top_p")}
        self.queue: queue.Queue = queue.Queue(maxsize=settings.max_queue)
        self.carry: Job | None = None  # a job that did not fit the last batch: first in the next one
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None
        self.buffer: list = []  # a step's events, handed to the event loops together (flush_events)
        self.preparing = 0  # requests the app is reading or preprocessing now: they will come (see _gather)
        self._preparing_lock = threading.Lock()

    # ---- the event loop's side ----------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="idefics3-serve-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is None:
            return
        while True:  # cancel what is waiting so the worker reaches the stop marker quickly
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", APIError(503, "the server is shutting down", headers={"Retry-After": "5"}))
        self.queue.put(None)
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def max_new_tokens(self, inputs: PreparedInputs, params: SamplingParams) -> int:
        room = self.context - inputs.prompt_tokens
        wanted = params.max_tokens if params.max_tokens is not None else self.settings.default_max_tokens
        return max(1, min(wanted, room))

    @contextlib.contextmanager
    def preparing_request(self):
        """Around the app's reading and preprocessing of one request: a batch being gathered keeps
        its window open while requests are on their way, and closes as soon as none is."""
        with self._preparing_lock:
            self.preparing += 1
        try:
            yield
        finally:
            with self._preparing_lock:
                self.preparing -= 1

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue is a 429 with Retry-After, a dead worker a 503."""
        if not self.alive:
            raise APIError(503, "the generation engine is not running", headers={"Retry-After": "5"})
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.settings.max_queue} requests are already waiting; "
                                "retry later", code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.queue.qsize())

    # ---- the worker's side ----------------------------------------------------------------
    def _run(self) -> None:
        running = RunningBatch(self.model, self.pad_id)
        stopping = False
        while True:
            if not running:
                if stopping:
                    return
                jobs = self._gather()  # nothing decoding: wait for work (and a window for company)
                if jobs is None:
                    return
            else:
                jobs, stopping = self._waiting(self.settings.max_batch_size - len(running), stopping)
            try:
                self._admit(running, [j for j in jobs if not self._dropped_while_waiting(j)])
                if running:
                    self._step(running)
            except Exception as exc:  # a bug or a device error: these requests fail, the server goes on
                error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
                flush_events(self.buffer)  # what they were sent so far goes before the error
                for job in list({id(j): j for j in [row.job for row in running.rows] + jobs}.values()):
                    if not job.done:
                        job.done = True
                        job.buffer = None
                        job.emit("error", error)
                running.clear()
            finally:
                flush_events(self.buffer)
                self.metrics.running.set(len(running))

    def _dropped_while_waiting(self, job: Job) -> bool:
        if job.cancelled:  # gone while waiting: no work for it
            job.done = True
            self.metrics.cancelled.inc()
        return job.cancelled

    def _waiting(self, room: int, stopping: bool) -> tuple[list[Job], bool]:
        """The jobs waiting now that fit in ``room`` rows (no wait); True once the stop marker was seen."""
        jobs: list[Job] = []
        while not stopping:
            job, self.carry = self.carry, None
            if job is None:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
            if job is None:
                stopping = True
                break
            if job.params.n > room:
                self.carry = job
                break
            jobs.append(job)
            room -= job.params.n
        self.metrics.queue_depth.set(self.queue.qsize() + (self.carry is not None))
        return jobs, stopping

    def _gather(self) -> list[Job] | None:
        """The next batch: the first waiting job, then whatever arrives within the window and fits."""
        first, self.carry = self.carry, None
        if first is None:
            first = self.queue.get()
        if first is None:
            return None
        jobs, rows = [first], first.params.n
        window = self.settings.batch_window_ms / 1000
        last_call = time.monotonic() + MAX_WINDOWS * window
        deadline = time.monotonic() + window
        while rows < self.settings.max_batch_size:
            try:
                job = self.queue.get(timeout=max(0.0, self._window_end(deadline, last_call) - time.monotonic()))
            except queue.Empty:
                if self.preparing and time.monotonic() < last_call:
                    continue  # a request is still being preprocessed: it joins if it comes in time
                break
            # each arrival keeps the window open a little longer (clients that were answered
            # together come back one request-parse apart), up to MAX_WINDOWS windows in all
            deadline = min(last_call, time.monotonic() + window)
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            if rows + job.params.n > self.settings.max_batch_size:
                self.carry = job
                break
            jobs.append(job)
            rows += job.params.n
        self.metrics.queue_depth.set(self.queue.qsize() + (self.carry is not None))
        return jobs

    def _window_end(self, deadline: float, last_call: float) -> float:
        """When to stop waiting for the next arrival: the window's deadline while requests are being
        prepared (they are coming), else a short grace only (one in GRACE_FRACTION of the window, for a
        request whose bytes the event loop has not read yet) instead of an idle rest of the window."""
        if self.preparing:
            return min(last_call, max(deadline, time.monotonic() + GRACE_POLL_S))
        return min(deadline, time.monotonic() + self.settings.batch_window_ms / 1000 / GRACE_FRACTION)

    def _admit(self, running: RunningBatch, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and join their rows to the running batch; their first tokens stream."""
        if not jobs:
            return
        for job in jobs:
            job.buffer = self.buffer
        rows = [Row(job, c, self.processor, set(self.eos_ids), self.defaults) for job in jobs
                for c in range(job.params.n)]
        self.metrics.batch_size.observe(len(rows))
        with torch.inference_mode():
            first = running.admit(rows, collate([row.job.inputs for row in rows], self.pad_id))
        self._push(rows, first)
        self._settle(running)

    def _step(self, running: RunningBatch) -> None:
        with torch.inference_mode():
            nxt = running.step()
        self._push(running.rows, nxt)
        self._settle(running)

    def _push(self, rows: list[Row], ids: torch.Tensor) -> None:
        now = time.monotonic()
        for row, token in zip(rows, ids.tolist()):
            if not row.finished:
                row.push(token, now, self.metrics)

    def _settle(self, running: RunningBatch) -> None:
        """Finish the rows of cancelled jobs, answer the jobs whose rows all finished (they do not
        wait for the others), and drop the finished rows from the batch."""
        for row in running.rows:
            if not row.finished and row.job.cancelled:
                row.finish("cancelled")
        jobs = {id(row.job): row.job for row in running.rows}.values()
        self._complete([job for job in jobs if job.open_rows == 0 and not job.done])
        running.drop_finished()

    def _complete(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            job.done = True
            if job.cancelled:
                self.metrics.cancelled.inc()
                continue
            self.metrics.completion_tokens.inc(job.completion_tokens)
            self.metrics.duration.observe(now - job.arrival)
            prompt = job.inputs.prompt_tokens
            job.emit("done", {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens,
                              "total_tokens": prompt + job.completion_tokens})
