"""Where a run's processor, model and data come from, by what the config names.

- ``model``: ``{"init": dir}`` (a checkpoint), ``{"preset": name, <component overrides>}`` (random
  weights), ``{"from_parts": {"vision": dir, "decoder": dir, "connector": name}}`` (a variant from
  transformers checkpoints, ``<image>`` taken from the processor's tokenizer), or a VLMConfig dict.
- ``processor``: ``{"path": dir}``; ``{"tokenizer": dir, "image": {<SplitterConfig fields>}}`` (a
  tokenizer of another model plus image settings, for a from_parts variant); empty: the model's
  ``init`` folder.
- ``data.source``: a file, a ``save_to_disk`` folder or a ``datasets.Dataset`` (``train/data.py``),
  or the name of a registered source.

A recipe registers its own builders (the demo registers the ``"synthetic"`` data source, the
``{"demo": true}`` model and the ``{"build": ...}`` processor when ``idefics3_kit.recipes.demo`` is
imported). An unknown name is an error listing the known ones.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import registry
from ..components.splitter import SplitterConfig
from ..config import VLMConfig
from ..hf import load_component
from ..model import VLM
from ..processing import Processor, TextTokenizer
from ..processing.processor import load_chat_template
from .collator import measure_dataset
from .data import ConversationDataset

_DATA: dict[str, Callable] = {}
_MODELS: dict[str, Callable] = {}  # keyed by the spec key that selects the builder ("init", "preset", ...)
_PROCESSORS: dict[str, Callable] = {}


def register_data(name: str, factory: Callable) -> None:
    """``factory(options, global_batch=, steps=, seed=)`` -> a dataset of (conversation, images)
    with ``name``, ``lengths`` (None: no length grouping), ``ordered`` and ``skipped``."""
    _DATA[name] = factory


def register_model(key: str, builder: Callable) -> None:
    """``builder(spec, processor, train_cfg, progress, fresh)`` -> VLM, for model specs that hold
    ``key``; ``fresh`` is False when a checkpoint will overwrite the weights (skip costly init work)."""
    _MODELS[key] = builder


def register_processor(key: str, builder: Callable) -> None:
    """``builder(spec, out_dir)`` -> Processor, for processor specs that hold ``key``."""
    _PROCESSORS[key] = builder


def data(data_cfg, processor, *, global_batch: int, steps: int, seed: int, where: str = "data"):
    """The dataset a config's ``data`` section names, checked and measured."""
    source = data_cfg.source
    if isinstance(source, str) and source in _DATA:
        return _DATA[source](data_cfg.options, global_batch=global_batch, steps=steps, seed=seed)
    if isinstance(source, str) and not os.path.exists(source):
        raise ValueError(f"{where}.source: {source!r} is neither a data file or folder nor a registered source "
                         f"(known: {sorted(_DATA)}; the demo's 'synthetic' registers when idefics3_kit.recipes.demo "
                         "is imported)")
    if data_cfg.options:
        raise ValueError(f"{where}.options: only a named source takes options, got {sorted(data_cfg.options)}")
    dataset = ConversationDataset.from_source(source, data_cfg.skip_bad_records, f"{where}.source")
    measure_dataset(dataset, processor, data_cfg.max_length)
    dataset.ordered = False
    return dataset


def model(spec: dict, processor, cfg=None, progress: bool = True, fresh: bool = True) -> VLM:
    for key, builder in _MODELS.items():
        if spec.get(key):
            return builder(spec, processor, cfg, progress, fresh)
    if not spec:
        raise ValueError("model: say how to build the model: {\"init\": checkpoint dir}, {\"preset\": name}, "
                         "{\"from_parts\": {...}} or a VLMConfig dict")
    return VLM(VLMConfig.from_dict(spec))


def processor(spec: dict, model_spec: dict, out_dir: str) -> Processor:
    for key, builder in _PROCESSORS.items():
        if key in spec:
            return builder(spec, out_dir)
    if not spec and model_spec.get("init"):
        return Processor.from_pretrained(model_spec["init"])
    raise ValueError(f"processor: expected one of {sorted(_PROCESSORS)} (e.g. {{\"path\": dir}}), or a model "
                     f"with \"init\" whose folder holds the processor; got {spec}")


def _from_checkpoint(spec: dict, processor=None, cfg=None, progress: bool = True, fresh: bool = True) -> VLM:
    _only(spec, {"init"}, "model")
    return VLM.from_pretrained(spec["init"])


def _from_preset(spec: dict, processor=None, cfg=None, progress: bool = True, fresh: bool = True) -> VLM:
    spec = dict(spec)
    return VLM(VLMConfig.preset(spec.pop("preset")).with_overrides(spec))


def _from_parts(spec: dict, processor, cfg=None, progress: bool = True, fresh: bool = True) -> VLM:
    """A variant from transformers checkpoints whose ``<image>`` is the processor's token: the
    decoder's vocabulary grows to hold the processor's tokenizer when it must."""
    _only(spec, {"from_parts"}, "model")
    parts = dict(spec["from_parts"])
    _only(parts, {"vision", "decoder", "connector"}, "model.from_parts")
    decoder: Any = load_component("decoder", parts["decoder"])  # its config, resize_token_embeddings: plain attributes
    needed = max(processor.image_token_id + 1, len(processor.tokenizer))
    if needed > decoder.config.vocab_size:
        decoder.resize_token_embeddings(needed)
    built = VLM.from_parts(vision=parts["vision"], decoder=decoder, connector=parts.get("connector", "pixel_shuffle"),
                           image_token_id=processor.image_token_id)
    processor.image_seq_len = built.config.image_seq_len  # the tokens per tile this model makes
    return built


def _processor_from_tokenizer(spec: dict, out_dir: str) -> Processor:
    _only(spec, {"tokenizer", "image", "chat_template"}, "processor")
    path = spec["tokenizer"]
    tokenizer = TextTokenizer.from_dir(path)
    splitter = registry.create("splitter", "idefics3", SplitterConfig(**spec.get("image", {})))
    template = spec.get("chat_template") or load_chat_template(path, {}, tokenizer.config)
    return Processor(tokenizer, splitter, 1, template)  # image_seq_len: set by the model it serves


def _only(spec: dict, keys: set, where: str) -> None:
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(keys)}")


register_model("init", _from_checkpoint)
register_model("preset", _from_preset)
register_model("from_parts", _from_parts)
register_processor("path", lambda spec, out_dir: Processor.from_pretrained(spec["path"]))
register_processor("tokenizer", _processor_from_tokenizer)
