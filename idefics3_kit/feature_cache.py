"""A bounded cache of image-tile features, so a second question about the same image skips the
vision tower (the most expensive part of the time to first token: seconds on a CPU).

The key of a tile is a hash of exactly what the tower sees: the tile's pixel values (the
processor's output, so the image content *and* the processor settings that produced them: size,
splitting, normalisation), its patch mask, dtype and shape. Equal keys therefore mean equal
inputs, and a cached answer is the uncached one. The cache also remembers which weights produced
its entries (each parameter's identity and in-place version counter): after a training step, a
``load_state_dict`` or a ``.to(dtype)`` the entries are dropped rather than served stale.

Off by default in the library (``VLM.enable_feature_cache``); ``idefics3-kit chat`` and the
server turn it on. It serves inference only: with autograd recording, features are computed
afresh so gradients flow to the tower.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable, Iterable

import torch

DEFAULT_MAX_BYTES = 256 * 2**20


def tile_key(pixels: torch.Tensor, patch_mask: torch.Tensor | None) -> bytes:
    """A 128-bit digest of one tile's pixels [3, S, S] and patch mask [h, w] (None: every patch real)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{pixels.dtype}|{tuple(pixels.shape)}|".encode())
    h.update(_raw_bytes(pixels))
    h.update(b"|full" if patch_mask is None else b"|mask" + _raw_bytes(patch_mask.to(torch.bool)))
    return h.digest()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (any dtype, bf16 included), without a copy when it is contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]  # numpy arrays export the buffer protocol


def weights_signature(params: Iterable[torch.Tensor]) -> tuple:
    """Which weights produce the features: identity, version counter, dtype and device of each
    parameter. Any change (an optimizer step, a load, a cast) changes the signature."""
    return tuple((id(p), p._version, p.dtype, p.device) for p in params)


class VisionFeatureCache:
    """Least-recently-used tile features, at most ``max_bytes`` of them."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise ValueError(f"VisionFeatureCache: max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._signature: tuple | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def features(self, pixels: torch.Tensor, patch_mask: torch.Tensor | None, signature: tuple,
                 encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """Features [N, S_img, Dt] of tiles ``pixels`` [N, 3, S, S] (+ ``patch_mask`` [N, h, w]):
        the cached rows, and ``encode(pixels[missing], patch_mask[missing])`` for the others."""
        keys = [tile_key(pixels[i], None if patch_mask is None else patch_mask[i]) for i in range(pixels.shape[0])]
        with self._lock:
            if signature != self._signature:
                self._entries.clear()
                self._bytes = 0
                self._signature = signature
            found = {i: self._entries[k] for i, k in enumerate(keys) if k in self._entries}
            for i in found:
                self._entries.move_to_end(keys[i])
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if not missing:
            return torch.stack([found[i] for i in range(len(keys))])
        index = torch.tensor(missing, device=pixels.device)
        fresh = encode(pixels.index_select(0, index),
                       None if patch_mask is None else patch_mask.index_select(0, index))  # [M, S_img, Dt]
        self._store([keys[i] for i in missing], fresh)
        if not found:
            return fresh
        rows = dict(zip(missing, fresh.unbind(0)))
        return torch.stack([found[i] if i in found else rows[i] for i in range(len(keys))])

    def _store(self, keys: list[bytes], features: torch.Tensor) -> None:
        with self._lock:
            for key, row in zip(keys, features.unbind(0)):
                row = row.clone()  # its own storage: a view would keep the whole batch's features alive
                size = row.numel() * row.element_size()
                if size > self.max_bytes:
                    continue
                if key in self._entries:
                    continue
                self._entries[key] = row
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
