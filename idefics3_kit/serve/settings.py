"""The server's settings: limits and switches, one frozen dataclass the app and engine share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """What ``idefics3-kit serve`` flags set. Defaults suit one model on one machine."""

    model_name: str = "idefics3"  # the id /v1/models lists and requests name
    api_key: str | None = None  # bearer key for /v1/* (None: open)
    max_batch_size: int = 8  # rows decoded together (a request with n choices takes n rows)
    batch_window_ms: float = 10.0  # how long the scheduler waits for more requests to join a batch
    max_queue: int = 64  # requests waiting for the engine; beyond it 429 + Retry-After
    max_body_bytes: int = 20 * 1024 * 1024
    max_images_per_request: int = 8
    max_image_pixels: int = 4096 * 4096  # per image, read from the header before decoding (bomb guard)
    max_tokens_cap: int = 1024  # the most new tokens one request may ask for
    default_max_tokens: int = 256  # when a request gives none (also bounded by the context)
    max_n: int = 8  # choices per request
    request_timeout_s: float = 300.0  # queue + generation; then 504 (or an error event when streaming)
    allowed_image_dir: str | None = None  # local image paths are served only from under this folder
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    remote_image_max_bytes: int = 20 * 1024 * 1024

    def __post_init__(self):
        for field in ("max_batch_size", "max_queue", "max_body_bytes", "max_images_per_request", "max_image_pixels",
                      "max_tokens_cap", "default_max_tokens", "max_n", "remote_image_max_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        for field in ("batch_window_ms",):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)!r}")
        for field in ("request_timeout_s", "remote_image_timeout_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for an open server)")

    def replace(self, **changes) -> "ServeSettings":
        return dataclasses.replace(self, **changes)
