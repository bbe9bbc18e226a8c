"""Images named by a request: ``data:`` URLs, local files (only under ``--allowed-image-dir``) and
remote URLs (only with ``--allow-remote-images``), each decoded with the pixel limit checked from
the header first, so a decompression bomb is refused before its pixels are allocated.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
import urllib.request

import torch

from ..processing.images import to_rgb
from .errors import APIError, bad_request
from .settings import ServeSettings


def load_image(url: str, settings: ServeSettings, where: str) -> torch.Tensor:
    """uint8 RGB [H, W, 3] for one ``image_url``; an APIError (400) naming ``where`` otherwise."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url.url must be a non-empty string", param="messages")
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data = _data_url_bytes(url, settings, where)
    elif scheme in ("http", "https"):
        data = _fetch(url, settings, where)
    elif scheme == "file" or scheme == "":
        return _decode(_local_path(url, settings, where), settings, where)
    else:
        raise bad_request(f"{where}: unsupported image URL scheme {scheme!r} (use a data: URL"
                          f"{', http(s)' if settings.allow_remote_images else ''} or a file path)", param="messages")
    return _decode(data, settings, where)


def _decode(source, settings: ServeSettings, where: str) -> torch.Tensor:
    try:
        return to_rgb(source, where=where, max_pixels=settings.max_image_pixels)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages", code="invalid_image") from None


def _data_url_bytes(url: str, settings: ServeSettings, where: str) -> bytes:
    """The bytes of ``data:[<mime>][;base64],<payload>``; only image types, only base64."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise bad_request(f"{where}: malformed data URL (no ',' after the header)", param="messages")
    meta = header[5:].split(";")
    mime = meta[0].strip().lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{where}: data URL type {mime!r} is not an image", param="messages")
    if "base64" not in (m.strip().lower() for m in meta[1:]):
        raise bad_request(f"{where}: data URLs must be base64-encoded (data:image/png;base64,...)",
                          param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 payload is not valid base64", param="messages") from None


def _local_path(url: str, settings: ServeSettings, where: str) -> str:
    """A file path inside the allowed folder after resolving symlinks and '..'; refused otherwise."""
    if settings.allowed_image_dir is None:
        raise bad_request(f"{where}: local image files are not allowed on this server (start it with "
                          "--allowed-image-dir DIR to serve images from DIR; or send a data: URL)", param="messages")
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{where}: file URL with a host ({parsed.netloc!r}) is not allowed", param="messages")
        path = urllib.parse.unquote(parsed.path)
    else:
        path = url
    root = os.path.realpath(settings.allowed_image_dir)
    full = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root; both are then checked
    if os.path.commonpath([root, full]) != root:
        raise bad_request(f"{where}: image path {path!r} is outside the allowed image folder", param="messages")
    if not os.path.isfile(full):
        raise bad_request(f"{where}: image file not found in the allowed image folder: {path!r}", param="messages")
    return full


def _fetch(url: str, settings: ServeSettings, where: str) -> bytes:
    """GET a remote image with a time limit and a size limit (read in chunks, never trusting the header)."""
    if not settings.allow_remote_images:
        raise bad_request(f"{where}: remote image URLs are not allowed on this server (start it with "
                          "--allow-remote-images, or send the image as a data: URL)", param="messages")
    limit = settings.remote_image_max_bytes
    request = urllib.request.Request(url, headers={"User-Agent": "idefics3-kit-serve"})
    try:
        with urllib.request.urlopen(request, timeout=settings.remote_image_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_large(where, limit)
            chunks, size = [], 0
            while chunk := response.read(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise _too_large(where, limit)
                chunks.append(chunk)
    except APIError:
        raise
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, bad URLs
        raise bad_request(f"{where}: cannot fetch the image URL: {exc}", param="messages",
                          code="image_fetch_failed") from None
    return b"".join(chunks)


def _too_large(where: str, limit: int) -> APIError:
    return bad_request(f"{where}: the remote image is larger than {limit} bytes", param="messages")
