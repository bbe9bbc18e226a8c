"""Translation between ``VLMConfig`` and Hugging Face ``config.json`` dictionaries.

Kept apart from config.py so the dataclasses stay readable. Handles both rope layouts that
transformers has used: the older ``rope_theta`` + ``rope_scaling`` keys and the newer
``rope_parameters`` dict (which carries ``rope_theta`` inside it).
"""

from __future__ import annotations

import dataclasses

from .config import EXTRA_KEY, HF_MODEL_TYPE, ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig

# transformers model_type of a text_config / vision_config  <->  our component name
DECODER_MODEL_TYPES = {"llama": "llama3", "qwen2": "qwen2"}
VISION_MODEL_TYPES = {"idefics3_vision": "siglip", "siglip_vision_model": "siglip", "clip_vision_model": "clip"}
_DECODER_TO_HF = {v: k for k, v in DECODER_MODEL_TYPES.items()}
_VISION_TO_HF = {"siglip": "idefics3_vision", "clip": "clip_vision_model"}

_ROPE_KEYS_DROPPED = ("rope_theta",)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _pick(data: dict, cls, name: str) -> dict:
    """The keys of ``data`` that ``cls`` knows, plus its registry name."""
    known = _fields(cls)
    out = {k: v for k, v in data.items() if k in known and k != "name"}
    out["name"] = name
    return out


def _config_class(kind: str, name: str, default):
    from . import registry

    try:
        return registry.config_class(kind, name) or default
    except KeyError:
        return default


def decoder_config_from_hf(text: dict, name: str | None = None) -> DecoderConfig:
    name = name or DECODER_MODEL_TYPES.get(text.get("model_type", "llama"), "llama3")
    cls = _config_class("decoder", name, DecoderConfig)
    fields = _pick(text, cls, name)
    rope = text.get("rope_parameters")
    if rope is None:  # older layout
        rope = dict(text.get("rope_scaling") or {})
        if "rope_theta" in text:
            rope["rope_theta"] = text["rope_theta"]
    rope = dict(rope)
    if "rope_theta" in rope:
        fields["rope_theta"] = float(rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k not in _ROPE_KEYS_DROPPED}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    fields["rope_scaling"] = None if kind == "default" else scaling
    if fields.get("head_dim") is None:
        fields.pop("head_dim", None)
    return cls(**fields)


def decoder_config_to_hf(dec: DecoderConfig) -> dict:
    out = {k: v for k, v in dataclasses.asdict(dec).items() if k not in ("name", "rope_theta", "rope_scaling")}
    out = {k: v for k, v in out.items() if v is not None}
    rope = {"rope_theta": float(dec.rope_theta), "rope_type": "default"}
    if dec.rope_scaling:
        rope.update(dec.rope_scaling)
    out["rope_parameters"] = rope
    out["model_type"] = _DECODER_TO_HF.get(dec.name, dec.name)
    return out


def vision_config_from_hf(vis: dict, name: str | None = None) -> VisionConfig:
    name = name or VISION_MODEL_TYPES.get(vis.get("model_type", "idefics3_vision"), "siglip")
    cls = _config_class("vision", name, VisionConfig)
    return cls(**_pick(vis, cls, name))


def vision_config_to_hf(vis) -> dict:
    out = {k: v for k, v in dataclasses.asdict(vis).items() if k != "name"}
    out["model_type"] = _VISION_TO_HF.get(vis.name, vis.name)
    return out


def vlm_config_from_hf(data: dict) -> VLMConfig:
    if not isinstance(data, dict):
        raise ValueError("config.json must hold a JSON object")
    model_type = data.get("model_type")
    if model_type not in (HF_MODEL_TYPE, "smolvlm"):
        raise ValueError(f"model_type: expected 'idefics3' (or 'smolvlm'), got {model_type!r}")
    for key in ("vision_config", "text_config"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"{key}: missing or not an object")
    names = data.get(EXTRA_KEY, {}).get("components", {})
    vision = vision_config_from_hf(data["vision_config"], names.get("vision"))
    decoder = decoder_config_from_hf(data["text_config"], names.get("decoder"))
    conn_name = names.get("connector", "pixel_shuffle")
    conn_cls = _config_class("connector", conn_name, ConnectorConfig)
    conn_fields = dict(data.get(EXTRA_KEY, {}).get("connector", {}))
    conn_fields.update(name=conn_name, scale_factor=int(data.get("scale_factor", 2)))
    connector = conn_cls(**{k: v for k, v in conn_fields.items() if k in _fields(conn_cls)})
    return VLMConfig(vision=vision, connector=connector, decoder=decoder,
                     image_token_id=int(data.get("image_token_id", 128257)))


def vlm_config_to_hf(cfg: VLMConfig) -> dict:
    out = {
        "architectures": ["Idefics3ForConditionalGeneration"],
        "model_type": HF_MODEL_TYPE,
        "image_token_id": cfg.image_token_id,
        "scale_factor": cfg.connector.scale_factor,
        "tie_word_embeddings": cfg.decoder.tie_word_embeddings,
        "vision_config": vision_config_to_hf(cfg.vision),
        "text_config": decoder_config_to_hf(cfg.decoder),
    }
    if not cfg.is_plain_idefics3:
        conn = {k: v for k, v in dataclasses.asdict(cfg.connector).items()
                if k not in ("name", "scale_factor", "in_dim", "out_dim")}
        out[EXTRA_KEY] = {"components": cfg.component_names, "connector": conn}
    return out
