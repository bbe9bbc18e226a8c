"""A live server on 127.0.0.1 (uvicorn in a background thread, a port the OS picks) with the shipped
demo model, and helpers to talk to it. One model load per session; servers per module or per test."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo():
    """(model, processor) of the shipped demo checkpoint."""
    import torch

    from idefics3_kit.recipes.demo.model import shipped_model_dir
    from idefics3_kit.serve.server import load

    torch.set_num_threads(1)
    return load(shipped_model_dir())


@contextlib.contextmanager
def live_server(model, processor, **settings):
    """Yield (base_url, app) of a server running until the block ends."""
    import uvicorn

    from idefics3_kit.serve import ServeSettings, create_app

    settings.setdefault("model_name", "demo")
    app = create_app(model, processor, ServeSettings(**settings))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    """The module's default server (small limits so that every limit is cheap to reach)."""
    image_dir = tmp_path_factory.mktemp("allowed_images")
    with live_server(*demo, allowed_image_dir=str(image_dir), max_images_per_request=2,
                     max_image_pixels=200 * 200, max_tokens_cap=64, max_body_bytes=2 * 1024 * 1024,
                     max_batch_size=8) as (url, app):
        app.state.image_dir = image_dir
        yield url, app


def client(base_url: str, api_key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)


def example_png() -> bytes:
    from idefics3_kit.recipes.demo.run import example_image_path

    with open(example_image_path(), "rb") as f:
        return f.read()


def png_bytes(width: int, height: int, colour=(0, 128, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(question: str = "What color is the circle?", url: str | None = None) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(example_png())}},
                                         {"type": "text", "text": question}]}]


class EngineGate:
    """Holds the engine's worker when requests next join the running batch, until ``release()``:
    makes queueing, batching, timeouts and cancellation deterministic to test. Records how many
    requests joined each time."""

    def __init__(self, app):
        self.engine = app.state.engine
        self.original = self.engine._admit
        self.entered, self.go = threading.Event(), threading.Event()
        self.batches: list[int] = []

        def gated(running, jobs):
            if not jobs:  # a decode step with nobody joining
                return self.original(running, jobs)
            self.batches.append(len(jobs))
            self.entered.set()
            self.go.wait(30)
            return self.original(running, jobs)

        self.engine._admit = gated

    def release(self):
        self.go.set()

    def restore(self):
        self.go.set()
        self.engine._admit = self.original
