"""Reading and writing the files users own: the one place for JSON objects and atomic writes.

Everything that reads a JSON file (config.json, tokenizer and processor configs, a safetensors
index, training configs) reads it through ``read_json_object``, so a bad file always fails the
same way: a ValueError naming the file and what is wrong. Everything written for a user goes
through ``write_text``/``write_bytes``: a temporary sibling, fsync, then a rename over the
target, so an interrupted save never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """The JSON object stored in ``path``; a ValueError naming the file (and ``what`` it is) otherwise."""
    path = os.fspath(path)
    label = path if not what or os.path.basename(path) == what else f"{path} ({what})"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{label}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"{label}: is a directory, expected a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: must hold a JSON object, holds a {type(data).__name__}")
    return data


def read_json_if_exists(path: str | os.PathLike, what: str | None = None) -> dict:
    """``read_json_object`` for an optional file: {} when there is none."""
    return read_json_object(path, what) if os.path.isfile(path) else {}


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs) -> None:
    """A JSON file written atomically (indent 2 and a final newline unless told otherwise)."""
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(data, **dump_kwargs) + "\n")
