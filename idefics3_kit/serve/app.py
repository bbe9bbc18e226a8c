"""The HTTP face: a FastAPI app answering OpenAI's chat API from one model.

    POST /v1/chat/completions   chat with text and images; ``stream: true`` as server-sent events
    GET  /v1/models             the served model
    GET  /health                200 while the engine runs, 503 otherwise
    GET  /metrics               Prometheus text

Every refusal is OpenAI's error JSON with a 4xx status (FastAPI's own validation and routing
errors included); a bug of ours is a 500 in the same shape, never a traceback. The request body
is read with its size bounded (the Content-Length header is checked first, then the bytes as
they arrive); parsing, image decoding and the processor run in a worker thread so the event
loop keeps serving; generation runs on the engine's thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job
from .errors import APIError, bad_request
from .metrics import Metrics
from .requests import ChatRequest, parse_chat_request, prepare_inputs
from .settings import ServeSettings

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25


def create_app(model, processor, settings: ServeSettings | None = None) -> FastAPI:
    """The app serving ``model`` with ``processor``; the engine starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    engine = Engine(model, processor, settings, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="idefics3_kit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.settings = engine, metrics, settings
    _install_error_handlers(app)
    app.add_middleware(_CountRequests, metrics=metrics)

    async def authorize(request: Request) -> None:
        # async: FastAPI runs a plain-def dependency in its thread pool, a thread hop per request
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(engine.queue.qsize() + (engine.carry is not None))
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "idefics3_kit"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorize)])
    async def one_model(name: str):
        if name != settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        with engine.preparing_request():
            body = await _read_json(request, settings.max_body_bytes)
            chat, inputs = await run_in_threadpool(_parse, body, settings, processor, engine.context)
            job = Job(inputs, chat.params, engine.max_new_tokens(inputs, chat.params), asyncio.get_running_loop(),
                      deadline=arrival + settings.request_timeout_s)
            job.arrival = arrival
            engine.submit(job)
        metrics.prompt_tokens.inc(inputs.prompt_tokens)
        reply = _Reply(settings.model_name, chat, job)
        if chat.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request)

    return app


def _parse(body, settings: ServeSettings, processor, context: int):
    chat = parse_chat_request(body, settings)
    return chat, prepare_inputs(chat, processor, context)


async def _read_json(request: Request, limit: int):
    """The body as JSON, refusing more than ``limit`` bytes whatever Content-Length says."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes)", code="request_too_large")


class _Reply:
    """Turns a job's events into OpenAI's response: one JSON object or a stream of chunks."""

    def __init__(self, model_name: str, chat: ChatRequest, job: Job):
        self.model, self.chat, self.job = model_name, chat, job
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.backlog: collections.deque = collections.deque()  # events taken from the queue, not yet sent

    def _merge_deltas(self, choice: int, text: str) -> str:
        """``text`` plus the deltas of the same choice already waiting: one chunk for them all when
        the client side runs behind the decode steps (the text is the same)."""
        while not self.job.events.empty():
            self.backlog.append(self.job.events.get_nowait())
        while self.backlog and self.backlog[0][0] == "delta" and self.backlog[0][1] == choice:
            text += self.backlog.popleft()[2]
        return text

    async def _next(self):
        if self.backlog:
            return self.backlog.popleft()
        remaining = self.job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.job.events.get(), timeout=max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.job.cancel()
            raise APIError(504, "the request timed out (--request-timeout) before the answer was complete",
                           code="timeout") from None

    async def whole(self, request: Request) -> dict:
        texts = [""] * self.chat.params.n
        reasons = [None] * self.chat.params.n
        watcher = asyncio.create_task(self._watch_disconnect(request))
        try:
            while True:
                kind, *rest = await self._next()
                if kind == "delta":
                    texts[rest[0]] += rest[1]
                elif kind == "finish":
                    reasons[rest[0]] = rest[1]
                elif kind == "error":
                    raise rest[0]
                else:
                    usage = rest[0]
                    break
        finally:
            watcher.cancel()
            if not self.job.done:
                self.job.cancel()
        choices = [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage, "system_fingerprint": None}

    async def _watch_disconnect(self, request: Request) -> None:
        """A non-streaming client that hangs up cancels its work (a streaming one cancels by closing)."""
        while not self.job.done:
            if await request.is_disconnected():
                self.job.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    def _chunk(self, choices: list, usage=None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, "system_fingerprint": None}
        if self.chat.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self):
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. A client that
        disconnects closes this generator, which cancels the job's rows in the engine."""
        try:
            for i in range(self.chat.params.n):
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}])
            while True:
                try:
                    kind, *rest = await self._next()
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                if kind == "delta":
                    text = self._merge_deltas(rest[0], rest[1])
                    yield self._chunk([{"index": rest[0], "delta": {"content": text}, "logprobs": None,
                                        "finish_reason": None}])
                elif kind == "finish":
                    yield self._chunk([{"index": rest[0], "delta": {}, "logprobs": None, "finish_reason": rest[1]}])
                elif kind == "error":
                    yield f"data: {json.dumps(rest[0].body())}\n\n"
                    return
                else:
                    if self.chat.include_usage:
                        yield self._chunk([], usage=rest[0])
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not self.job.done:
                self.job.cancel()


# ---- errors and request counting --------------------------------------------------------------

def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error_response(bad_request(f"{where or 'request'}: {first.get('msg', 'invalid request')}",
                                           param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        message = {404: f"no route {request.url.path!r} (see /v1/chat/completions, /v1/models, /health, /metrics)",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                            str(exc.detail))
        return _error_response(APIError(exc.status_code, message, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        return _error_response(APIError(500, f"internal server error: {type(exc).__name__}", type="server_error"))


class _CountRequests:
    """Pure ASGI middleware (it never buffers a stream): counts requests by route and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in ROUTES else "/v1/models" if route.startswith("/v1/models/") else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.inc(route=route, code=str(status["code"]))
