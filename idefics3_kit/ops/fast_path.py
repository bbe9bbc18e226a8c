"""The one predicate every fast path asks: may the compiled op run instead of plain PyTorch?

Speed never costs composability. A compiled kernel (or a prepacked weight) replaces the
ordinary PyTorch code only when running it is certainly the same as calling the modules the
user has:

- the backend is the compiled one and has ``op`` for the tensors' device;
- every tensor is a plain ``torch.Tensor`` / ``nn.Parameter`` (no DTensor, no torchao or other
  quantized tensor, no FakeTensor or functional tensor, nothing on the meta device), all on one
  device;
- no autograd is needed (grad mode off, or no tensor requires grad): the kernels have no backward;
- every module is exactly one of the plain classes (``nn.Linear`` and friends, and the
  component classes marked with ``plain_module``): a wrapped module (activation-checkpoint
  wrapper, FSDP's dynamic class, peft's LoRA layers) or a user's subclass is not;
- no forward hooks, on the modules or installed globally;
- not inside torch.compile / torch.export tracing (the ordinary code is what they trace).

Anything else runs the ordinary PyTorch path, which gives the same answer.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from . import _library

PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)
_PLAIN_MODULES: set[type] = {nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d, nn.ModuleList}


def plain_module(cls: type) -> type:
    """Class decorator: instances of exactly this class (not of a subclass) count as plain."""
    _PLAIN_MODULES.add(cls)
    return cls


def global_hooks() -> bool:
    """True when forward hooks are installed for every module (``register_module_forward_hook``)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def plain_modules(modules: Sequence[nn.Module]) -> bool:
    """Every module exactly of a plain class, without forward hooks (and no global hooks)."""
    if global_hooks():
        return False
    if torch.compiler.is_compiling():  # (first: tracing must not reach the import machinery)
        return plain_modules_reference(modules)
    compiled = _library.compiled_function("plain_modules")
    return plain_modules_reference(modules) if compiled is None else compiled(modules, _PLAIN_MODULES)


def plain_modules_reference(modules: Iterable[nn.Module]) -> bool:
    """``plain_modules`` without the global-hook check, in Python (the compiled one's reference)."""
    for m in modules:
        if type(m) not in _PLAIN_MODULES or m._forward_hooks or m._forward_pre_hooks:
            return False
    return True


def plain_tensors(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype | None = None,
                  contiguous: bool = False) -> str | None:
    """The device type shared by the (non-None) tensors when all are plain and need no grad, else None.

    ``dtype``: every tensor must also have this dtype; ``contiguous``: every tensor must also be
    contiguous. Runs over every weight of a decode step (hundreds of tensors), so it runs in C
    where the extension is loaded (csrc/python/fast_path.cpp, ~20x faster); the Python
    ``plain_tensors_reference`` gives the same answers and runs under torch.compile tracing.
    """
    if torch.compiler.is_compiling():  # (first: tracing must not reach the import machinery)
        return plain_tensors_reference(tensors, dtype, contiguous)
    compiled = _library.compiled_function("plain_tensors")
    if compiled is None:
        return plain_tensors_reference(tensors, dtype, contiguous)
    like = None if dtype is None else _dtype_probe(dtype)
    return compiled(tensors, PLAIN_TENSOR_TYPES, torch.is_grad_enabled(), like, contiguous)


_DTYPE_PROBES: dict[torch.dtype, torch.Tensor] = {}


def _dtype_probe(dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor of ``dtype``: how the compiled check is told the dtype (see fast_path.cpp)."""
    probe = _DTYPE_PROBES.get(dtype)
    if probe is None:
        probe = _DTYPE_PROBES[dtype] = torch.empty(0, dtype=dtype)
    return probe


def plain_tensors_reference(tensors: Iterable[torch.Tensor | None], dtype: torch.dtype | None = None,
                            contiguous: bool = False) -> str | None:
    """``plain_tensors`` in Python: the compiled check's reference, and what runs without it."""
    grad = torch.is_grad_enabled()
    plain = PLAIN_TENSOR_TYPES
    kind: str | None = None
    first: torch.Tensor | None = None  # set together with kind
    for t in tensors:
        if t is None:
            continue
        if (type(t) not in plain or (grad and t.requires_grad) or (dtype is not None and t.dtype != dtype)
                or (contiguous and not t.is_contiguous())):
            return None
        if first is None:
            first, kind = t, t.device.type
        elif kind == "cpu":
            if not t.is_cpu:
                return None
        elif t.device != first.device:
            return None
    return kind or "cpu"


def usable(op: str, tensors: Sequence[torch.Tensor | None] = (), modules: Sequence[nn.Module] = ()) -> bool:
    """Whether the compiled ``op`` may replace the ordinary code for these tensors and modules."""
    if torch.compiler.is_compiling():
        return False
    device = plain_tensors(tensors)
    if device is None or not plain_modules(modules):
        return False
    return _library.has_kernel(op, device)


# ---- state snapshots for cached plans --------------------------------------------------------

_SEPARATOR = object()  # ends each module dict's entries in a snapshot (see module_state)


def module_state(modules: Sequence[nn.Module], attrs: tuple[str, ...] = (), previous: tuple | None = None) -> tuple:
    """A snapshot of what a plan built from these modules depends on: each module, its class, the
    keys and values of its ``_parameters`` and ``_modules`` (in order), and its instance attributes
    ``attrs`` (None when absent); not its buffers, which the plain classes' forwards do not read.
    ``previous`` itself when the snapshot holds exactly the same objects (identity, never ``==``),
    so ``module_state(ms, a, old) is old`` says nothing was replaced, added or removed since
    ``old`` was taken.

    Why: a decode step needs every layer's weights in one list; walking the modules for them took
    ~0.1-0.2 ms of Python per step. A cached list is safe as long as no module, parameter, child or
    attribute it came from was rebound, which this tells in C (csrc/python/fast_path.cpp) in a
    fraction of that. What a snapshot does not see (a tensor's dtype or layout changed in place,
    hooks) the plain checks above still ask at every call.
    """
    if torch.compiler.is_compiling():
        return module_state_reference(modules, attrs, previous)
    compiled = _library.compiled_function("module_state")
    if compiled is None:
        return module_state_reference(modules, attrs, previous)
    return compiled(modules, attrs, _SEPARATOR, previous)


def module_watch(modules: Sequence[nn.Module]):
    """A watch of these modules for ``unchanged_since``, or None where there is none to take (no
    extension, a Python without dict version tags (3.13 on), a module without its nn.Module dicts).

    Why: ``module_state`` walks every entry of every module's dicts, ~130 µs per decode step of
    SmolVLM-256M with the caches cold, and ``plain_modules`` walks them again for hooks. The watch
    keeps each module's class, its instance dict and its ``_parameters``, ``_modules``,
    ``_forward_hooks`` and ``_forward_pre_hooks`` dicts with their version tags
    (csrc/python/fast_path.cpp), which ``unchanged_since`` compares in a few cache lines per module."""
    if torch.compiler.is_compiling():
        return None
    compiled = _library.compiled_function("module_watch")
    return None if compiled is None else compiled(modules)


def unchanged_since(watch) -> bool:
    """True when nothing ``module_state`` or ``plain_modules`` (but for the global hooks) sees in
    the watched modules changed since ``module_watch``: then ``module_state`` of them returns its
    previous snapshot and ``plain_modules`` its previous answer. False when something may have: a
    dict written back with what it held also counts, so callers then ask them. False for None."""
    if watch is None:
        return False
    compiled = _library.compiled_function("unchanged_since")
    return False if compiled is None else bool(compiled(watch))


def module_state_reference(modules: Iterable[nn.Module], attrs: tuple[str, ...] = (),
                           previous: tuple | None = None) -> tuple:
    """``module_state`` in Python: the compiled one's reference, and what runs without it."""
    found: list = []
    for m in modules:
        found += (m, type(m))
        instance = object.__getattribute__(m, "__dict__")
        for name in ("_parameters", "_modules"):
            entries = instance.get(name)
            if not isinstance(entries, dict):
                found.append(None)
                continue
            for key, value in entries.items():
                found += (key, value)
            found.append(_SEPARATOR)
        found += [instance.get(a) for a in attrs]
    if (isinstance(previous, tuple) and len(previous) == len(found)
            and all(a is b for a, b in zip(previous, found))):
        return previous
    return tuple(found)
