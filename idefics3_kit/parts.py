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

import torch
import torch.nn as nn

from . import checkpoint, hf_config, registry

_STANDALONE_VISION = {"clip_vision_model", "siglip_vision_model", "idefics3_vision"}
_DUAL_ENCODERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_VLM_TYPES = {"idefics3", "smolvlm"}
# tensors of a standalone vision checkpoint that are not part of the encoder
_VISION_EXTRAS = ("head.", "visual_projection.")


def read_config_json(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (expected a checkpoint directory written by transformers)")
    from .model import read_json_object

    return read_json_object(file)


def _header_names(path: str) -> set[str]:
    return set(checkpoint.read_header_shapes(checkpoint.checkpoint_files(path)))


def vision_source(path: str, data: dict | None = None):
    """(config, prefixes, ignore) for the vision encoder stored in checkpoint dir ``path``."""
    data = read_config_json(path) if data is None else data
    model_type = data.get("model_type")
    if model_type in _STANDALONE_VISION:
        cfg = hf_config.vision_config_from_hf(data)
        theirs = "vision_model." if any(n.startswith("vision_model.") for n in _header_names(path)) else ""
        extras = tuple(theirs + e for e in _VISION_EXTRAS)
        return cfg, (("", theirs),), lambda n: n.startswith(extras) or not n.startswith(theirs)
    if model_type in _DUAL_ENCODERS:
        vis = dict(data.get("vision_config") or {})
        vis.setdefault("model_type", _DUAL_ENCODERS[model_type])
        cfg = hf_config.vision_config_from_hf(vis)
        extras = tuple("vision_model." + e for e in _VISION_EXTRAS)
        return cfg, (("", "vision_model."),), lambda n: n.startswith(extras) or not n.startswith("vision_model.")
    if model_type in _VLM_TYPES:
        cfg = hf_config.vlm_config_from_hf(data).vision
        return cfg, (("", "model.vision_model."),), lambda n: not n.startswith("model.vision_model.")
    raise ValueError(f"{path}: model_type {model_type!r} is not a vision checkpoint this toolkit reads "
                     f"(known: {', '.join(sorted(_STANDALONE_VISION | set(_DUAL_ENCODERS) | _VLM_TYPES))})")


def decoder_source(path: str, data: dict | None = None):
    """(config, prefixes, ignore) for the decoder stored in checkpoint dir ``path``."""
    data = read_config_json(path) if data is None else data
    model_type = data.get("model_type")
    if model_type in hf_config.DECODER_MODEL_TYPES:
        cfg = hf_config.decoder_config_from_hf(data)
        # our decoder's parameter names are the CausalLM ones (model.*, lm_head.*)
        return cfg, (("", ""),), lambda n: n.endswith("rotary_emb.inv_freq")
    if model_type in _VLM_TYPES:
        cfg = hf_config.vlm_config_from_hf(data).decoder
        prefixes = (("lm_head.", "lm_head."), ("model.", "model.text_model."))
        return cfg, prefixes, lambda n: not n.startswith(("lm_head.", "model.text_model."))
    raise ValueError(f"{path}: model_type {model_type!r} is not a decoder checkpoint this toolkit reads "
                     f"(known: {', '.join(sorted(set(hf_config.DECODER_MODEL_TYPES) | _VLM_TYPES))})")


def _tied(cfg) -> dict:
    if getattr(cfg, "tie_word_embeddings", False):
        return {"lm_head.weight": "model.embed_tokens.weight"}
    return {}


def load_component(kind: str, path, *, dtype=None, device=None) -> nn.Module:
    """A ``vision`` or ``decoder`` component with the weights of checkpoint directory ``path``."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} checkpoint directory not found: {path}")
    if kind == "vision":
        cfg, prefixes, ignore = vision_source(path)
        tied = {}
    elif kind == "decoder":
        cfg, prefixes, ignore = decoder_source(path)
        tied = _tied(cfg)
    else:
        raise ValueError(f"load_component reads vision or decoder checkpoints, not {kind!r}")
    from .model import resolve_dtype

    with torch.device("meta"):
        module = registry.create(kind, cfg.name, cfg)
    checkpoint.load_into(module, path, dtype=resolve_dtype(dtype), device=device, prefixes=prefixes,
                         tied=tied, ignore=ignore)
    return module.eval()


def add_token(decoder: nn.Module) -> int:
    """Grow a decoder's vocabulary by one token (e.g. ``<image>``); returns the new token's id.

    The new embedding (and LM-head row when untied) is the mean of the existing rows, a common
    choice that keeps the new token's logits and embedding in the range of the others. Works
    for decoders that expose ``model.embed_tokens``, ``lm_head`` and a ``config`` with
    ``vocab_size`` (every built-in decoder).
    """
    try:
        embed, head, cfg = decoder.model.embed_tokens, decoder.lm_head, decoder.config
    except AttributeError:
        raise TypeError(f"cannot add a token to {type(decoder).__name__}: it has no model.embed_tokens/lm_head/"
                        "config; pass image_token_id explicitly") from None
    new_id = cfg.vocab_size
    tied = head.weight is embed.weight
    w = embed.weight.detach()
    new_embed = nn.Embedding(new_id + 1, w.shape[1], device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new_embed.weight[:new_id] = w
        new_embed.weight[new_id] = w.float().mean(0).to(w.dtype)
    decoder.model.embed_tokens = new_embed
    if tied:
        new_head = nn.Linear(w.shape[1], new_id + 1, bias=False, device=w.device, dtype=w.dtype)
        new_head.weight = new_embed.weight
    else:
        hw = head.weight.detach()
        new_head = nn.Linear(hw.shape[1], new_id + 1, bias=head.bias is not None, device=hw.device, dtype=hw.dtype)
        with torch.no_grad():
            new_head.weight[:new_id] = hw
            new_head.weight[new_id] = hw.float().mean(0).to(hw.dtype)
            if head.bias is not None:
                new_head.bias[:new_id] = head.bias
                new_head.bias[new_id] = head.bias.float().mean().to(head.bias.dtype)
    new_head.train(head.training)
    decoder.lm_head = new_head
    decoder.config = dataclasses.replace(cfg, vocab_size=new_id + 1)
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
        cls = registry.config_class("connector", value)
        if cls is None:
            raise TypeError(f"connector {value!r} has no config class")
        return cls(name=value) if "name" in {f.name for f in dataclasses.fields(cls)} else cls()
    if isinstance(value, dict):
        name = value.get("name", "pixel_shuffle")
        return registry.make_config(registry.get("connector", name), value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    raise TypeError(f"connector=: expected a connector name, a ConnectorConfig or a dict, got {type(value).__name__}")
