"""The compiled extension: loading it, the choice of backend, what it has for which device,
and what this CPU can do (the one owner of every CPU-feature probe)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import TypedDict

import torch

from .. import files

logger = logging.getLogger("idefics3_kit")

FORCE_REFERENCE_ENV = "IDEFICS3_KIT_FORCE_REFERENCE"
NAMESPACE = "idefics3_kit"

class _State(TypedDict):
    loaded: bool | None  # None: not tried yet
    error: str | None
    announced: bool
    forced: bool


_state: _State = {"loaded": None, "error": None, "announced": False, "forced": False}


def _load() -> bool:
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        if importlib.util.find_spec("idefics3_kit._C") is None:
            raise ImportError("idefics3_kit._C is not built (pip install --no-build-isolation -e . , or "
                              "python setup.py build_ext --inplace)")
        importlib.import_module("idefics3_kit._C")  # runs the TORCH_LIBRARY registrations
        loaded = True
    except Exception as exc:  # ImportError, OSError (ABI mismatch), ...
        loaded = False
        _state["error"] = f"{type(exc).__name__}: {exc}"
    _state["loaded"] = loaded
    return loaded


def _forced() -> bool:
    return _state["forced"] or os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def fast_paths_on() -> bool:
    """False while the reference ops are forced (``IDEFICS3_KIT_FORCE_REFERENCE=1``, ``use_reference()``):
    then every fast path, compiled or not, steps aside."""
    return not _forced()


def has_extension() -> bool:
    """True when the compiled extension is loaded (whether or not it is in use)."""
    return _load()


def extension_error() -> str | None:
    """Why the extension did not load, or None."""
    _load()
    return _state["error"]


def use_compiled() -> bool:
    """True when ops should dispatch to the compiled extension (loaded and not forced off)."""
    if _forced():
        return False
    ok = _load()
    if not ok and not _state["announced"]:
        _state["announced"] = True
        logger.warning("idefics3_kit: compiled extension not available (%s); using the reference "
                       "PyTorch ops", _state["error"])
    return ok


def defines(op: str) -> bool:
    """True when the extension is loaded and declares ``idefics3_kit::<op>`` (any backend)."""
    return _load() and hasattr(getattr(torch.ops, NAMESPACE), op)


def compiled_function(name: str):
    """A function of the ``_C`` module itself (csrc/python: the compiled fast-path checks), or None
    when the extension is not loaded. Not affected by forcing the reference ops: these functions
    answer exactly what their Python references answer."""
    found = _COMPILED_FUNCTIONS.get(name, _MISSING)
    if found is _MISSING:
        found = _COMPILED_FUNCTIONS[name] = (getattr(importlib.import_module("idefics3_kit._C"), name, None)
                                             if _load() else None)
    return found


_MISSING = object()
_COMPILED_FUNCTIONS: dict[str, object] = {}


_KERNELS: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, device_type: str) -> bool:
    """True when the compiled ``op`` should run for tensors on ``device_type`` ("cpu" or "cuda").

    Asked on every fast-path decision (hundreds of times per decode step): the answer per
    (op, device) is looked up once; forcing the reference ops still takes effect at once.
    """
    if _forced():
        return False
    key = (op, device_type)
    found = _KERNELS.get(key)
    if found is None:
        found = _KERNELS[key] = _find_kernel(op, device_type)
    return found


def _find_kernel(op: str, device_type: str) -> bool:
    if not use_compiled() or not defines(op):
        return False
    if device_type == "cpu":
        return True
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "CUDA"))
    except RuntimeError:
        return False


# ---- CUDA kernels check themselves ---------------------------------------------------------------

SELFCHECK_ENV = "IDEFICS3_KIT_CUDA_SELFCHECK"
_TRUSTED: dict[tuple, bool] = {}


def kernel_trusted(op_name: str, key: tuple, check) -> bool:
    """Whether the CUDA kernel ``op_name`` may run for ``key`` (its device, dtype, ...).

    The CUDA kernels were written without a GPU. The first use of each (op, key) in a process
    runs ``check()`` -> (ok, detail): a small case against the PyTorch reference. A mismatch or an
    error logs one warning naming the op and the caller falls back to the PyTorch path for that
    key from then on. ``IDEFICS3_KIT_CUDA_SELFCHECK=0`` trusts the kernels without checking.
    During CUDA-graph capture an unchecked kernel is not used (a check cannot run there).
    """
    full = (op_name, *key)
    trusted = _TRUSTED.get(full)
    if trusted is not None:
        return trusted
    if os.environ.get(SELFCHECK_ENV, "1") == "0":
        _TRUSTED[full] = True
        return True
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    try:
        trusted, detail = check()
    except Exception as exc:  # a launch failure, an illegal address, ...: the kernel is not used
        trusted, detail = False, f"{type(exc).__name__}: {exc}"
    if not trusted:
        logger.warning("idefics3_kit: the CUDA kernel %s failed its self-check for %s (%s); using the PyTorch "
                       "path for it (report this; %s=0 skips the check)", op_name,
                       ", ".join(str(k) for k in key), detail, SELFCHECK_ENV)
    _TRUSTED[full] = bool(trusted)
    return bool(trusted)


def selfcheck_results() -> dict[tuple, bool]:
    """What the self-checks found so far in this process: (op, key...) -> trusted."""
    return dict(_TRUSTED)


def op(name: str):
    """``torch.ops.idefics3_kit.<name>``: the only way code outside ops/ reaches a compiled op is
    through an op module's wrapper, and the wrappers reach it through here."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def register_fake(name: str):
    """Decorator attaching a fake (meta) kernel to ``idefics3_kit::<name>`` when the op exists,
    so it traces under torch.compile; a no-op without the extension."""
    def decorator(fn):
        if defines(name):
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
        return fn

    return decorator


def same_device(op: str, named) -> None:
    """Refuse tensors on more than one device: ``named`` holds (argument name, tensor or None).

    The fake kernels call it first. The dispatcher sends a call whose tensors are on the CPU
    but for one on the meta device to the op's fake kernel, which would otherwise return an
    uninitialised CPU tensor (or, for the in-place ops, silently do nothing).
    """
    first = None
    for name, t in named:
        if t is None:
            continue
        if first is None:
            first = (name, t.device)
        elif t.device != first[1]:
            raise RuntimeError(f"{op}: {name} must be on the device of {first[0]} ({first[1]}), got {t.device}")


def build_info() -> dict | None:
    """What the extension was built from (written by setup.py), or None when it is absent."""
    path = Path(__file__).resolve().parent.parent / "_build_info.json"
    if not _load() or not path.exists():
        return None
    return files.read_json_object(path, "_build_info.json")


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


# ---- this CPU ----------------------------------------------------------------------------------


def _read_cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# Read once, at import: code that torch.compile traces asks too (attention's router), and a
# constant costs it nothing where reading the file would break the graph.
_CPU_FLAGS = _read_cpu_flags()


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return _CPU_FLAGS


@functools.lru_cache(maxsize=1)
def cpu_is_vectorized() -> bool:
    """Whether torch found AVX2 (or better) or an ARM vector unit: the kernels' portable path is
    slower than torch's own on CPUs without one."""
    try:
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "")
    except Exception:  # older torch: assume a modern x86/ARM CPU
        return True


def cpu_has(flag: str) -> bool:
    """e.g. ``cpu_has("avx512_bf16")``, ``cpu_has("amx_bf16")``."""
    return flag in cpu_flags()


def _query_onednn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a torch without the query: assume not
        return False


# Asked once, at import, like the CPU flags: code that torch.compile traces asks too, and the
# query is a torch op returning a bool, which dynamo cannot trace.
_ONEDNN_BF16 = _query_onednn_bf16()


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU (AVX-512 or newer). Without it (an AVX2-only CPU
    such as AMD Zen 3) ``torch.ops.mkldnn._linear_pointwise`` refuses bf16 ("could not create a
    primitive descriptor"), while ``F.linear`` still runs it through a slow fallback."""
    return _ONEDNN_BF16


def bf16_as_float32(x: torch.Tensor) -> bool:
    """Whether the many-row bf16 work on x (linears, the patch conv, the blocked prefill attention)
    runs as float32 on the exact upcasts, rounded once: a bf16 CPU tensor on a CPU without oneDNN
    bf16, where torch's bf16 kernels fall back to slow loops (docs/performance.md, "CPUs without
    AVX-512"). The one rule every such path asks."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not onednn_bf16()
