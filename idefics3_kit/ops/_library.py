"""Loading of the compiled extension and the choice of backend."""

from __future__ import annotations

import contextlib
import logging
import os

logger = logging.getLogger("idefics3_kit")

FORCE_REFERENCE_ENV = "IDEFICS3_KIT_FORCE_REFERENCE"

_state = {"loaded": None, "error": None, "announced": False, "forced": False}


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        import importlib
        import importlib.util

        if importlib.util.find_spec("idefics3_kit._C") is None:
            raise ImportError("idefics3_kit._C is not built (pip install --no-build-isolation -e . , or "
                              "python setup.py build_ext --inplace)")
        importlib.import_module("idefics3_kit._C")  # runs the TORCH_LIBRARY registrations
        from . import _fake

        _fake.register()
        _state["loaded"] = True
    except Exception as exc:  # ImportError, OSError (ABI mismatch), ...
        _state["loaded"] = False
        _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def _forced() -> bool:
    return _state["forced"] or os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def has_extension() -> bool:
    """True when the compiled extension is loaded (whether or not it is in use)."""
    return _load()


def extension_error() -> str | None:
    """Why the extension did not load, or None."""
    _load()
    return _state["error"]


def use_compiled() -> bool:
    """True when ops should dispatch to the compiled extension."""
    if _forced():
        return False
    ok = _load()
    if not ok and not _state["announced"]:
        _state["announced"] = True
        logger.warning("idefics3_kit: compiled extension not available (%s); using the reference "
                       "PyTorch ops", _state["error"])
    return ok


def build_info() -> dict | None:
    """What the extension was built from (written by setup.py), or None when it is absent."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    if not _load() or not path.exists():
        return None
    return json.loads(path.read_text())


def backend() -> str:
    """``"compiled"`` when the C++ extension runs the ops, else ``"reference"``."""
    return "compiled" if use_compiled() else "reference"


@contextlib.contextmanager
def use_reference(enabled: bool = True):
    """Context manager forcing the reference ops (for comparisons and debugging)."""
    old = _state["forced"]
    _state["forced"] = enabled
    try:
        yield
    finally:
        _state["forced"] = old
