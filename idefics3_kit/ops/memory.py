"""Pooled CPU allocation for large, repeatedly requested outputs (the preprocessing batch).

``empty_pooled(shape, dtype)`` is ``torch.empty`` whose memory, once the tensor is freed, is
kept (up to ``IDEFICS3_KIT_POOL_MB`` megabytes of idle buffers, default 512, the least recently
returned dropped first; 0 turns pooling off) and handed to the next request of the same byte
size. A fresh multi-megabyte allocation is a fresh mmap whose pages the kernel zeroes on first
touch; at SmolVLM geometry that measured as much time as the resize itself (docs/ops.md).
``release_pooled()`` frees the idle buffers and returns their bytes. The reference backend (or a
missing extension) uses plain ``torch.empty``.

The tensors are ordinary CPU tensors, except that their storage cannot be resized in place.
"""

from __future__ import annotations

import operator

import torch

from . import _library


def _sizes(shape) -> list[int]:
    """``shape`` as a list of ints, each an integer >= 0 (not a bool, not a float: int(2.5) would
    silently give a smaller tensor than asked for)."""
    try:
        items = list(shape)
    except TypeError:
        raise ValueError(f"empty_pooled: shape must be a sequence of ints, got {shape!r}") from None
    sizes = []
    for i, s in enumerate(items):
        try:
            value = None if isinstance(s, bool) else operator.index(s)
        except TypeError:
            value = None
        if value is None or value < 0:
            raise ValueError(f"empty_pooled: shape[{i}] must be an integer >= 0, got {s!r} "
                             f"({type(s).__name__}) in {shape!r}")
        sizes.append(value)
    return sizes


def empty_pooled(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized CPU tensor of ``shape`` whose memory is pooled after it is freed."""
    shape = _sizes(shape)
    if _library.has_kernel("empty_pooled", "cpu") and not torch.compiler.is_compiling():
        return _library.op("empty_pooled")(shape, dtype)
    return torch.empty(shape, dtype=dtype)


def release_pooled() -> int:
    """Free the pool's idle buffers; returns the number of bytes freed (0 without the extension)."""
    if _library.defines("release_pooled"):
        return int(_library.op("release_pooled")())
    return 0


@_library.register_fake("empty_pooled")
def _empty_pooled_fake(size, dtype):
    return torch.empty(size, dtype=dtype)
