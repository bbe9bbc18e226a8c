"""Component registry: every swappable part of a VLM is registered here by (kind, name).

Components register with ``@register(kind, name)``; ``create(kind, name, config)`` builds
one from its config dataclass; ``list_components()`` says what is available. Third-party
packages add components through the ``idefics3_kit.plugins`` entry-point group: each entry
point names a module (or callable) that registers components when imported. Plugins are
loaded lazily, on the first lookup, so importing idefics3_kit stays cheap, and a plugin that
fails to import only produces a warning naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import importlib.metadata
import warnings
from typing import Any, Callable

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


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_plugins_loaded = False
_plugins_loading = False


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register(kind: str, name: str, config_class: type | None = None):
    """Decorator registering a component class (or factory function) as ``kind/name``.

    The config class is taken from ``config_class`` or, if omitted, from the decorated
    object's ``config_class`` attribute. A duplicate name is refused with an error that
    names both the existing and the new component.
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"component name must be a non-empty string, got {name!r}")

    def decorator(obj):
        cfg_cls = config_class if config_class is not None else getattr(obj, "config_class", None)
        table = _REGISTRY[kind]
        if name in table:
            old = table[name]
            raise ValueError(
                f"duplicate {kind} component {name!r}: already registered by {old.origin}, "
                f"refused for {_origin(obj)}"
            )
        table[name] = Entry(kind, name, obj, cfg_cls, _origin(obj))
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
    global _plugins_loaded, _plugins_loading
    if (_plugins_loaded and not force) or _plugins_loading:
        return
    _plugins_loading = True
    try:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if force and _already_imported(ep):
                continue
            try:
                target = ep.load()  # importing the module registers its components
                if inspect.isfunction(target):
                    target()  # "pkg.module:register_all" style entry points
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the library
                warnings.warn(
                    f"idefics3_kit plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                    f"{type(exc).__name__}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _plugins_loaded = True
    finally:
        _plugins_loading = False


def _already_imported(ep) -> bool:
    import sys

    return ep.value.split(":")[0] in sys.modules


def _ensure_builtin() -> None:
    # The built-in components register themselves when their modules are imported.
    importlib.import_module("idefics3_kit.components")


def get(kind: str, name: str) -> Entry:
    """Look up a registered component; an unknown name lists the known ones."""
    _check_kind(kind)
    _ensure_builtin()
    if name not in _REGISTRY[kind]:
        load_plugins()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY[kind])) or "(none)"
        raise KeyError(f"unknown {kind} component {name!r}; known {kind} components: {known}") from None


def config_class(kind: str, name: str) -> type | None:
    return get(kind, name).config_class


def create(kind: str, name: str, config: Any = None, **overrides):
    """Build component ``kind/name`` from ``config``.

    ``config`` may be an instance of the component's config class, a dict of its fields, or
    None for the defaults; ``overrides`` replace individual fields.
    """
    entry = get(kind, name)
    cfg = make_config(entry, config, overrides)
    return entry.builder(cfg) if cfg is not None else entry.builder()


def make_config(entry: Entry, config: Any = None, overrides: dict | None = None):
    cls = entry.config_class
    overrides = overrides or {}
    if cls is None:
        if config is not None or overrides:
            raise TypeError(f"{entry.kind} component {entry.name!r} takes no config")
        return None
    if config is None:
        config = cls(**_with_name(cls, entry.name, {}))
    elif isinstance(config, dict):
        config = cls(**_with_name(cls, entry.name, dict(config)))
    elif not isinstance(config, cls):
        raise TypeError(
            f"{entry.kind} component {entry.name!r} expects a {cls.__name__} config, "
            f"got {type(config).__name__}"
        )
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config


def _with_name(cls: type, name: str, fields: dict) -> dict:
    if dataclasses.is_dataclass(cls) and "name" in {f.name for f in dataclasses.fields(cls)}:
        fields.setdefault("name", name)
    return fields


def list_components(kind: str | None = None):
    """Names of the registered components: a sorted list for one kind, or a dict of all kinds."""
    _ensure_builtin()
    load_plugins()
    if kind is not None:
        _check_kind(kind)
        return sorted(_REGISTRY[kind])
    return {k: sorted(v) for k, v in _REGISTRY.items()}


def describe(kind: str, name: str) -> str:
    entry = get(kind, name)
    return f"{kind}/{name} ({entry.origin})"
