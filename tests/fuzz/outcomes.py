"""What every fuzz case asserts: the documented result, or an exception whose message names the
problem. Anything else (an IndexError from deep inside torch, a KeyError of one word, a crash,
a hang) fails the case."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

# The exception types our public API raises for bad input (TemplateLimitError, RecordError and
# CheckpointError are ValueErrors; FloatingPointError is NaN logits).
CLEAR = (ValueError, TypeError, FileNotFoundError, FloatingPointError)

FAST, FULL = 25, 400


def check_clear(exc: BaseException, names=()) -> None:
    message = str(exc)
    assert isinstance(exc, CLEAR), f"{type(exc).__name__} is not one of our error types: {message}"
    assert len(message) >= 15 and "Traceback" not in message, f"unclear message: {message!r}"
    if names:
        assert any(name in message for name in names), f"the message names none of {names}: {message!r}"


def outcome(fn, names=()):
    """('ok', result) or ('error', exc) after checking the error is a clear one."""
    try:
        return "ok", fn()
    except CLEAR as exc:
        check_clear(exc, names)
        return "error", exc


def fuzz(*strategies, fast: int = FAST, full: int = FULL):
    """Two tests from one property: ``fast`` examples always, ``full`` examples marked slow."""

    def make(fn):
        def variant(examples):
            return settings(max_examples=examples, deadline=None, derandomize=examples == fast,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                   HealthCheck.function_scoped_fixture])(given(*strategies)(fn))

        return variant(fast), pytest.mark.slow(variant(full))

    return make
