"""Single components from existing checkpoints, for assembling VLM variants (``VLM.from_parts``).

``load_component(kind, path)`` builds a registered vision encoder or decoder from a Hugging Face
checkpoint directory written by transformers, on the meta device first so no random weights are
allocated. Which directories are understood (the layout is read from ``config.json``'s
``model_type`` and the tensor names in the safetensors header):

========  ==============================================  ==================================
kind      ``model_type`` of the directory                 tensors used
========  ==============================================  ==================================
vision    ``clip_vision_model`` (CLIPVisionModel[...])    ``[vision_model.]*``
vision    ``siglip_vision_model`` (SiglipVisionModel)     ``[vision_model.]*`` (``head.*`` dropped)
vision    ``clip`` / ``siglip`` (dual encoders)           ``vision_model.*``
vision    ``idefics3`` / ``smolvlm`` (also our variants)  ``model.vision_model.*``
decoder   ``llama`` / ``qwen2`` (…ForCausalLM)            ``model.*``, ``lm_head.*``
decoder   ``idefics3`` / ``smolvlm`` (also our variants)  ``model.text_model.*``, ``lm_head.*``
========  ==============================================  ==================================

Everything else in a larger checkpoint (the other tower, projection heads) is ignored; a tensor
of the selected part that is missing, left over or of the wrong shape is an error naming it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.nn as nn

from .. import files, registry
from ..config import HF_MODEL_TYPES as VLM_MODEL_TYPES
from ..config import VLMConfig, hf_model_types, sub_config_from_hf
from . import weights

# tensors of a standalone vision checkpoint that are not part of the encoder
_VISION_EXTRAS = ("head.", "visual_projection.")


def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (expected a checkpoint directory written by transformers)")
    return files.read_json_object(file, "config.json")


def _header_names(path: str) -> set[str]:
    return set(weights.read_header_shapes(weights.checkpoint_files(path)))


def _known_types(kind: str, key: str = "model_types") -> dict[str, str]:
    """model_type -> component name, from the registry entries' ``hf`` metadata."""
    found: dict[str, str] = {}
    for entry in registry.entries(kind):
        value = entry.hf.get(key, ())
        for model_type in ((value,) if isinstance(value, str) else value):
            found.setdefault(model_type, entry.name)
    return found


def vision_source(path: str, data: dict | None = None):
    """(config, prefixes, ignore) for the vision encoder stored in checkpoint dir ``path``."""
    data = read_config_json(path) if data is None else data
    model_type = data.get("model_type")
    standalone, dual = _known_types("vision"), _known_types("vision", "dual_encoder")
    if model_type in standalone:
        cfg = sub_config_from_hf("vision", data)
        theirs = "vision_model." if any(n.startswith("vision_model.") for n in _header_names(path)) else ""
        extras = tuple(theirs + e for e in _VISION_EXTRAS)
        return cfg, (("", theirs),), lambda n: n.startswith(extras) or not n.startswith(theirs)
    if model_type in dual:
        entry = registry.get("vision", dual[model_type])
        vis = {"model_type": hf_model_types(entry)[-1], **(data.get("vision_config") or {})}
        cfg = sub_config_from_hf("vision", vis, entry.name)
        extras = tuple("vision_model." + e for e in _VISION_EXTRAS)
        return cfg, (("", "vision_model."),), lambda n: n.startswith(extras) or not n.startswith("vision_model.")
    if model_type in VLM_MODEL_TYPES:
        cfg = VLMConfig.from_hf_dict(data).vision
        return cfg, (("", "model.vision_model."),), lambda n: not n.startswith("model.vision_model.")
    known = sorted(set(standalone) | set(dual) | set(VLM_MODEL_TYPES))
    raise ValueError(f"{path}: model_type {model_type!r} is not a vision checkpoint this toolkit reads "
                     f"(known: {', '.join(known)})")


def decoder_source(path: str, data: dict | None = None):
    """(config, prefixes, ignore) for the decoder stored in checkpoint dir ``path``."""
    data = read_config_json(path) if data is None else data
    model_type = data.get("model_type")
    decoders = _known_types("decoder")
    if model_type in decoders:
        cfg = sub_config_from_hf("decoder", data)
        # our decoder's parameter names are the CausalLM ones (model.*, lm_head.*)
        return cfg, (("", ""),), lambda n: n.endswith("rotary_emb.inv_freq")
    if model_type in VLM_MODEL_TYPES:
        cfg = VLMConfig.from_hf_dict(data).decoder
        prefixes = (("lm_head.", "lm_head."), ("model.", "model.text_model."))
        return cfg, prefixes, lambda n: not n.startswith(("lm_head.", "model.text_model."))
    raise ValueError(f"{path}: model_type {model_type!r} is not a decoder checkpoint this toolkit reads "
                     f"(known: {', '.join(sorted(set(decoders) | set(VLM_MODEL_TYPES)))})")


def load_component(kind: str, path, *, dtype=None, device=None, allow_nonfinite: bool = False) -> nn.Module:
    """A ``vision`` or ``decoder`` component with the weights of checkpoint directory ``path``."""
    path = files.readable_directory(os.fspath(path), f"{kind} checkpoint directory")
    if kind == "vision":
        cfg, prefixes, ignore = vision_source(path)
    elif kind == "decoder":
        cfg, prefixes, ignore = decoder_source(path)
    else:
        raise ValueError(f"load_component reads vision or decoder checkpoints, not {kind!r}")
    with torch.device("meta"):
        module = registry.create(kind, cfg.name, cfg)
    weights.load_into(module, path, dtype=resolve_dtype(dtype), device=device, prefixes=prefixes, ignore=ignore,
                      allow_nonfinite=allow_nonfinite)
    return module.eval()


def add_token(decoder: nn.Module) -> int:
    """Grow a decoder's vocabulary by one token (e.g. ``<image>``); returns the new token's id.

    Works for decoders with ``resize_token_embeddings`` and a ``config`` with ``vocab_size``
    (every built-in decoder; the new rows are the mean of the existing ones).
    """
    resize = getattr(decoder, "resize_token_embeddings", None)
    if not callable(resize) or not hasattr(decoder, "config"):
        raise TypeError(f"cannot add a token to {type(decoder).__name__}: it has no resize_token_embeddings/config; "
                        "pass image_token_id explicitly")
    config: Any = decoder.config  # a plain attribute (mypy reads Module attributes as Tensor | Module)
    new_id: int = config.vocab_size
    resize(new_id + 1)
    return new_id


def resolve_part(kind: str, value, *, dtype=None, device=None) -> tuple[nn.Module, str | None]:
    """A component module for ``VLM.from_parts``, and the checkpoint dir it came from (if any).

    ``value``: a checkpoint directory (str or PathLike), an already built component module of
    this kind (used as is), or a config of a registered component (fresh random weights).
    """
    if isinstance(value, (str, os.PathLike)):
        return load_component(kind, value, dtype=dtype, device=device), os.fspath(value)
    if isinstance(value, nn.Module):
        got = getattr(type(value), "component_kind", None)
        if got != kind or not hasattr(value, "config"):
            raise TypeError(f"{kind}=: expected a registered {kind} component module (with .config), got "
                            f"{type(value).__name__}" + (f" (a {got} component)" if got else ""))
        return value, None
    if dataclasses.is_dataclass(value) and not isinstance(value, type) and hasattr(value, "name"):
        module = registry.create(kind, value.name, value)
        return module, None
    raise TypeError(f"{kind}=: expected a checkpoint directory, a {kind} component module or a {kind} config, "
                    f"got {type(value).__name__}")


def connector_config(value):
    """A connector config from a registry name, a config object or a dict of its fields."""
    if isinstance(value, str):
        return registry.make_config(registry.get("connector", value))
    if isinstance(value, dict):
        return registry.make_config(registry.get("connector", value.get("name", "pixel_shuffle")), value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    raise TypeError(f"connector=: expected a connector name, a ConnectorConfig or a dict, got {type(value).__name__}")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype, its name ("bfloat16", "bf16", ...) or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
