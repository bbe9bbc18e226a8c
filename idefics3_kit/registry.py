"""The component registry: every swappable part of a VLM, by (kind, name).

This module is the floor of the house: it imports nothing from idefics3_kit. The built-in
components register themselves when ``idefics3_kit.components`` is imported (the package's
``__init__`` does that, as timm's model modules do), third-party packages through the
``idefics3_kit.plugins`` entry-point group, loaded lazily on the first lookup that misses so
importing idefics3_kit stays cheap. A plugin that fails to import only warns.

    @register("connector", "avgpool")             # a class with a config_class attribute
    class AvgPool(nn.Module): ...

    create("connector", "avgpool", {"scale_factor": 2, "in_dim": 8, "out_dim": 4})
    list_components()                             # {"vision": [...], "connector": [...], ...}

An entry may carry ``hf``: what the Hugging Face mapping (``idefics3_kit.hf``) needs to read
and write this component's ``config.json``, e.g. ``{"model_types": ("llama",)}``. The registry
stores it untouched, so no other module keeps a table of names.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import sys
import warnings
from typing import Any, Callable, Mapping

KINDS = ("vision", "connector", "decoder", "splitter", "sampler")
ENTRY_POINT_GROUP = "idefics3_kit.plugins"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered component: what builds it, its config class, where it came from."""

    kind: str
    name: str
    builder: Callable[..., Any]
    config_class: type | None
    origin: str  # "module.qualname" of the builder, used in duplicate-name errors
    hf: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # read by idefics3_kit.hf only


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_plugins = {"loaded": False, "loading": False}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register(kind: str, name: str, config_class: type | None = None, *, hf: Mapping[str, Any] | None = None):
    """Decorator registering a component class (or factory function) as ``kind/name``.

    The config class is ``config_class`` or else the decorated object's ``config_class``
    attribute. A duplicate name is refused with an error naming both components.
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"component name must be a non-empty string, got {name!r}")

    def decorator(obj):
        cfg_cls = config_class if config_class is not None else getattr(obj, "config_class", None)
        table = _REGISTRY[kind]
        if name in table:
            raise ValueError(f"duplicate {kind} component {name!r}: already registered by {table[name].origin}, "
                             f"refused for {_origin(obj)}")
        table[name] = Entry(kind, name, obj, cfg_cls, _origin(obj), dict(hf or {}))
        try:
            obj.component_kind = kind
            obj.component_name = name
        except (AttributeError, TypeError):
            pass
        return obj

    return decorator


def unregister(kind: str, name: str) -> None:
    """Remove a component (mainly for tests and interactive experiments)."""
    _check_kind(kind)
    _REGISTRY[kind].pop(name, None)


def load_plugins(force: bool = False) -> None:
    """Import every ``idefics3_kit.plugins`` entry point once (or again with ``force``)."""
    if (_plugins["loaded"] and not force) or _plugins["loading"]:
        return
    _plugins["loading"] = True
    try:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if force and ep.value.split(":")[0] in sys.modules:
                continue
            try:
                target = ep.load()  # importing the module registers its components
                if inspect.isfunction(target):
                    target()  # "pkg.module:register_all" style entry points
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the library
                warnings.warn(f"idefics3_kit plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
        _plugins["loaded"] = True
    finally:
        _plugins["loading"] = False


def get(kind: str, name: str) -> Entry:
    """Look up a registered component; an unknown name lists the known ones."""
    _check_kind(kind)
    if name not in _REGISTRY[kind]:
        load_plugins()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise KeyError(f"unknown {kind} component {name!r}; known {kind} components: {known}") from None


def entries(kind: str) -> list[Entry]:
    """Every registered component of ``kind`` (plugins included), sorted by name."""
    _check_kind(kind)
    load_plugins()
    return [_REGISTRY[kind][name] for name in sorted(_REGISTRY[kind])]


def config_class(kind: str, name: str) -> type | None:
    return get(kind, name).config_class


def create(kind: str, name: str, config: Any = None, **overrides):
    """Build component ``kind/name`` from ``config`` (its config object, a dict of its fields, or
    None for the defaults); ``overrides`` replace individual fields."""
    entry = get(kind, name)
    cfg = make_config(entry, config, overrides)
    return entry.builder(cfg) if cfg is not None else entry.builder()


def make_config(entry: Entry, config: Any = None, overrides: Mapping[str, Any] | None = None):
    """The config object of ``entry`` from an instance, a dict of fields or None, with overrides.

    The one place where a dict becomes a component config: unknown fields are an error that
    names them and the config class.
    """
    cls = entry.config_class
    overrides = dict(overrides or {})
    if cls is None:
        if config is not None or overrides:
            raise TypeError(f"{entry.kind} component {entry.name!r} takes no config")
        return None
    if config is None:
        config = {}
    if isinstance(config, Mapping):
        config = _from_fields(cls, entry, {**config, **overrides})
        overrides = {}
    elif not isinstance(config, cls):
        raise TypeError(f"{entry.kind} component {entry.name!r} expects a {cls.__name__} config, "
                        f"got {type(config).__name__}")
    if overrides:
        _check_fields(cls, entry, overrides)
        config = dataclasses.replace(config, **overrides)
    return config


def _from_fields(cls: type, entry: Entry, fields: dict):
    if dataclasses.is_dataclass(cls):
        _check_fields(cls, entry, fields)
        if "name" in {f.name for f in dataclasses.fields(cls)}:
            fields.setdefault("name", entry.name)
    return cls(**fields)


def _check_fields(cls: type, entry: Entry, fields: Mapping[str, Any]) -> None:
    if not dataclasses.is_dataclass(cls):
        return
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"{entry.kind} component {entry.name!r}: unknown config field(s) {unknown} for "
                        f"{cls.__name__}; known: {sorted(known)}")


def list_components(kind: str | None = None):
    """Names of the registered components: a sorted list for one kind, or a dict of all kinds."""
    load_plugins()
    if kind is not None:
        _check_kind(kind)
        return sorted(_REGISTRY[kind])
    return {k: sorted(v) for k, v in _REGISTRY.items()}


def describe(kind: str, name: str) -> str:
    entry = get(kind, name)
    return f"{kind}/{name} ({entry.origin})"
