"""oneDNN-packed bf16 weights (float32 copies of them on CPUs without oneDNN bf16): the one owner
of the packed copies that the decode steps (ops/matmul.py) and the many-row linears
(ops/dense_linear.py) read.

oneDNN's bf16 linear re-lays-out a plain [N, K] weight for its kernel on every call; a copy packed
once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's freezing does) skips that, with
bit-identical outputs. Which layers get copies is each caller's policy (``matmul.prepare_decode``
for decode steps, ``dense_linear.pack_weights`` for many rows); this module keeps the copies.

Copies are kept off the modules (weak references), so deepcopy / pickle / state_dict never see the
opaque oneDNN tensors. A copy is keyed by the first layer of its group (a group such as q|k|v is
packed concatenated) and the row count it was packed for (``rows``: 1 for decode steps, None for
any), and remembers the weights it was made from: a weight modified in place or with swapped data
(``module.to(...)``) makes it stale, and ``get`` packs again.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch
import torch.nn as nn

from . import _library

_PACKS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()  # layer -> {rows: (keys, packed)}
_LOCK = threading.Lock()


def _reorderable(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can hold a packed bf16 copy of this weight here (a CPU bf16 weight, a torch
    with the reorder op, a CPU where oneDNN runs bf16 matmuls)."""
    return _reorderable(weight) and _library.onednn_bf16()


def can_pack_as_float32(weight: torch.Tensor) -> bool:
    """Whether this bf16 weight's copy would be a packed float32 one: the route of CPUs where
    oneDNN has no bf16 matmul (``_library.bf16_as_float32``), whose many-row linears compute in
    float32 on the exact upcasts. There the copy also saves the upcast of the weight at every call
    (a fresh float32 tensor, page-faulted in: fc1's [3072 x 768] took 70.3 ms with it against 63.6
    packed, on a 2-core Zen 3)."""
    return _reorderable(weight) and not _library.onednn_bf16()


def _weight_key(w: torch.Tensor) -> tuple:
    return w, w._version, w.data_ptr(), w.dtype


def fresh(layers: Sequence[nn.Linear], rows: int | None) -> torch.Tensor | None:
    """The packed weight of ``layers`` for ``rows`` if one was made from their current weights, else None."""
    cached = _PACKS.get(layers[0], {}).get(rows)
    if cached is None:
        return None
    keys = tuple(_weight_key(layer.weight) for layer in layers)
    if len(cached[0]) == len(keys) and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(cached[0], keys)):
        return cached[1]
    return None


def get(layers: Sequence[nn.Linear], rows: int | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The packed weight of ``layers`` (concatenated for a group) for ``rows``, packed on first use
    and whenever the weights changed since; ``dtype``: the copy's (float32 for the upcast route,
    ``can_pack_as_float32``), else the weights' own. A process packs one dtype per (layer, rows):
    which is a property of its CPU."""
    packed = fresh(layers, rows)
    if packed is not None and (dtype is None or packed.dtype == dtype):
        return packed
    keys = tuple(_weight_key(layer.weight) for layer in layers)
    with torch.no_grad(), _LOCK:
        w = torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else layers[0].weight.detach()
        if dtype is not None:
            w = w.to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        _PACKS.setdefault(layers[0], {})[rows] = (keys, packed)
    return packed


def drop(module: nn.Module, rows: int | None) -> None:
    """Forget the copies packed for ``rows`` of ``module``'s layers (children included)."""
    with _LOCK:
        for layer in module.modules():
            copies = _PACKS.get(layer)
            if copies is not None:
                copies.pop(rows, None)
                if not copies:
                    del _PACKS[layer]
