"""An OpenAI-compatible HTTP server for a VLM (optional extra: ``pip install idefics3_kit[serve]``).

    create_app(model, processor, ServeSettings(...))  -> a FastAPI app (engine started by its lifespan)
    server.run(model_dir, settings, host, port, ...)  -> load and serve with uvicorn

Rooms: ``settings`` (limits), ``errors`` (OpenAI's error shape), ``images`` (data:/file/remote
images with pixel limits), ``requests`` (request bodies -> messages, images, sampling, prompt),
``engine`` (the batching worker thread), ``metrics`` (Prometheus text), ``app`` (routes),
``server`` (loading + uvicorn). docs/serve.md is the user's page. FastAPI and uvicorn are
imported only here, so the core package imports without them.
"""

from __future__ import annotations

from .app import create_app
from .errors import APIError
from .settings import ServeSettings

__all__ = ["create_app", "APIError", "ServeSettings"]
