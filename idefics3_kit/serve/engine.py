"""The batching engine: one worker thread runs the model; requests arriving together decode together.

Dynamic batching with a short gather window: the worker takes the first waiting request, waits
up to ``batch_window_ms`` for more (up to ``max_batch_size`` rows; a request with ``n`` choices
takes ``n`` rows), each arrival keeping the window open for another ``batch_window_ms`` (at most
``MAX_WINDOWS`` windows in all: clients answered together come back one request-parse apart, and
a fixed window split them into two or three batches), left-pads their prompts into one batch and runs the ordinary generation loop
(``generation.generate_steps``, KV cache and fast paths included) over it. Each row has its own
sampler (temperature, top_p, top_k, seed: one generator per row), its own token budget and stop
strings, and finishes on its own: its text is final and its stream ends while the other rows go
on. New requests wait for the running batch to end (this is not continuous batching: a request
never joins a batch already decoding). A cancelled row (client gone, timeout) stops streaming at
once; when every row of a batch is finished or cancelled the batch stops.

Results go back to each request's ``asyncio.Queue`` through ``loop.call_soon_threadsafe``:
``("delta", choice, text)``, ``("finish", choice, reason)``, ``("done", usage)`` or ``("error", APIError)``.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
import warnings

import torch

from ..components.sampler import SamplerState, build_chain
from ..generation import generate_steps, resolve_settings
from ..streaming import IncrementalDetokenizer
from .errors import APIError
from .metrics import Metrics
from .requests import PreparedInputs, SamplingParams
from .settings import ServeSettings


MAX_WINDOWS = 4  # the most a batch's gathering waits: this many windows after its first request


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


class RowSampler:
    """generate_steps' ``sampler=``: each row picks its token with its own chain and generator."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.greedy = [i for i, r in enumerate(rows) if r.greedy]

    def __call__(self, logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
        ids = logits.argmax(dim=-1)  # the greedy rows (the greedy selector is argmax)
        for i, row in enumerate(self.rows):
            if row.greedy or row.finished:
                continue
            sub = SamplerState(tokens=None if state.tokens is None else state.tokens[i:i + 1], new_tokens=state.new_tokens,
                               eos_token_ids=state.eos_token_ids, generators=row.generator,
                               pad_lengths=None if state.pad_lengths is None else state.pad_lengths[i:i + 1])
            ids[i] = row.chain(logits[i:i + 1], sub)[0]
        return ids


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
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            for job in (j for j in jobs if j.cancelled):  # gone while waiting: no work for them
                job.done = True
                self.metrics.cancelled.inc()
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            try:
                self._decode(jobs)
            except Exception as exc:  # a bug or a device error: these requests fail, the server goes on
                error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")
                for job in jobs:
                    if not job.done:
                        job.done = True
                        job.emit("error", error)
            finally:
                self.metrics.running.set(0)

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
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
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

    def _decode(self, jobs: list[Job]) -> None:
        buffer: list = []
        for job in jobs:
            job.buffer = buffer
        try:
            self._decode_rows(jobs)
        finally:
            for job in jobs:
                job.buffer = None
            flush_events(buffer)

    def _decode_rows(self, jobs: list[Job]) -> None:
        buffer = jobs[0].buffer
        rows = [Row(job, c, self.processor, set(self.eos_ids), self.defaults) for job in jobs
                for c in range(job.params.n)]
        batch = collate([row.job.inputs for row in rows], self.pad_id)
        max_new = max(job.max_new for job in jobs)
        self.metrics.batch_size.observe(len(rows))
        self.metrics.running.set(len(rows))
        # no eos for the loop itself: each row ends on its own eos (or ignores it), and the loop
        # ends when every row has ended
        settings = resolve_settings({}, self.model.decoder.config, max_new_tokens=max_new, eos_token_id=[],
                                    pad_token_id=self.pad_id)
        with warnings.catch_warnings():
            # a short prompt padded to a long one may run past the context in the padded layout;
            # its own positions stay inside (each row was checked against the context)
            warnings.filterwarnings("ignore", message="the prompt .* exceeds the model's context")
            steps = generate_steps(self.model, **batch, sampler=RowSampler(rows), settings=settings)
            try:
                with torch.inference_mode():
                    next(steps)  # the prompt
                    while not self._settle(rows, jobs):
                        nxt = next(steps, None)
                        if nxt is None:
                            break
                        now = time.monotonic()
                        for i, token in enumerate(nxt.tolist()):
                            if not rows[i].finished:
                                rows[i].push(token, now, self.metrics)
                        if buffer:
                            flush_events(buffer)
            finally:
                steps.close()
        for row in rows:  # the loop ended (budget spent) with rows still open: they ran out of length
            row.finish("length")
        self._settle(rows, jobs)

    def _settle(self, rows: list[Row], jobs: list[Job]) -> bool:
        """Drop the rows of cancelled jobs and answer the jobs whose rows all finished (they do not
        wait for the batch); True when no row is left to decode."""
        for row in rows:
            if not row.finished and row.job.cancelled:
                row.finish("cancelled")
        self._complete([job for job in jobs if job.open_rows == 0 and not job.done])
        return all(row.finished for row in rows)

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
