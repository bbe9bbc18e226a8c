"""Where a training run's processor, model and data come from, by the key that names them.

A training config names them: ``"processor": {"path": dir}``, ``"model": {"init": dir}`` /
``{"preset": name, ...}`` / a VLMConfig dict, ``"data": {"source": name, ...}``. The built-in
builders are registered below; a recipe registers its own (the demo registers the
``"synthetic"`` data source, the ``{"demo": true}`` model and the ``{"build": ...}`` processor
when ``idefics3_kit.recipes.demo`` is imported). An unknown name is an error listing the known ones.
"""

from __future__ import annotations

from typing import Callable

from ..config import VLMConfig
from ..model import VLM
from ..processing import Processor

_DATA: dict[str, Callable] = {}
_MODELS: dict[str, Callable] = {}  # keyed by the spec key that selects the builder ("init", "preset", ...)
_PROCESSORS: dict[str, Callable] = {}


def register_data(name: str, factory: Callable) -> None:
    """``factory(data_cfg, batch_size, start_index, examples_per_step)`` -> endless iterator of example lists."""
    _DATA[name] = factory


def register_model(key: str, builder: Callable) -> None:
    """``builder(spec, processor, train_cfg, progress)`` -> VLM, for model specs that hold ``key``."""
    _MODELS[key] = builder


def register_processor(key: str, builder: Callable) -> None:
    """``builder(spec, out_dir)`` -> Processor, for processor specs that hold ``key``."""
    _PROCESSORS[key] = builder


def data(data_cfg: dict, batch_size: int, start_index: int, examples_per_step: int):
    name = data_cfg.get("source")
    if name not in _DATA:
        raise ValueError(f"data.source: unknown data source {name!r}; known: {sorted(_DATA)} (the demo's "
                         "'synthetic' source registers when idefics3_kit.recipes.demo is imported)")
    return _DATA[name](data_cfg, batch_size, start_index, examples_per_step)


def model(spec: dict, processor, cfg=None, progress: bool = True) -> VLM:
    for key, builder in _MODELS.items():
        if spec.get(key):
            return builder(spec, processor, cfg, progress)
    return VLM(VLMConfig.from_dict(spec))


def processor(spec: dict, out_dir: str) -> Processor:
    for key, builder in _PROCESSORS.items():
        if key in spec:
            return builder(spec, out_dir)
    raise ValueError(f"processor: expected one of {sorted(_PROCESSORS)} (e.g. {{\"path\": dir}}), got {spec}")


def _from_checkpoint(spec: dict, processor=None, cfg=None, progress: bool = True) -> VLM:
    return VLM.from_pretrained(spec["init"])


def _from_preset(spec: dict, processor=None, cfg=None, progress: bool = True) -> VLM:
    spec = dict(spec)
    return VLM(VLMConfig.preset(spec.pop("preset")).with_overrides(spec))


register_model("init", _from_checkpoint)
register_model("preset", _from_preset)
register_processor("path", lambda spec, out_dir: Processor.from_pretrained(spec["path"]))
