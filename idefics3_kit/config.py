"""Configuration: one frozen dataclass per component kind, composed into ``VLMConfig``.

Each component config carries ``name``, the registry name of the component that builds it,
so a config alone says how to assemble the model. Component-specific configs (CLIP, Qwen2, a
plugin's) subclass these bases and live beside their components.

The Hugging Face ``config.json`` format is the configs' own file format, so its mapping lives
here too (and in a subclass that needs to adapt it, e.g. ``DecoderConfig``'s rope keys): a
plugin's config then brings its mapping along, and the component names come from the registry
entries' ``hf`` metadata (``{"model_types": (...)}``), never from a table kept here.
``VLMConfig`` reads and writes ``config.json`` (``model_type: idefics3``); a variant whose parts
are not the Idefics3 ones records their names under the extra key ``idefics3_kit``, while a
plain Idefics3 config stays byte-compatible with transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, cast

from . import files, registry
from .presets import PRESETS

HF_MODEL_TYPES = ("idefics3", "smolvlm")  # what config.json may say; we write the first
EXTRA_KEY = "idefics3_kit"  # where non-Idefics3 component names live in config.json
PLAIN_IDEFICS3 = {"vision": "siglip", "connector": "pixel_shuffle", "decoder": "llama3"}


def require(cond: bool, config: str, field_name: str, message: str) -> None:
    """The one error style of config validation: ``Config.field: what is wrong``."""
    if not cond:
        raise ValueError(f"{config}.{field_name}: {message}")


def require_finite(cfg: Any, name: str, *, positive: bool = True) -> None:
    value = getattr(cfg, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(ok and (value > 0 if positive else value >= 0), type(cfg).__name__, name,
            f"must be a finite number{' > 0' if positive else ' >= 0'}, got {value!r}")


def require_bools(cfg: Any, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(isinstance(value, bool), type(cfg).__name__, name, f"must be true or false, got {value!r}")


def require_positive_ints(cfg: Any, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0, type(cfg).__name__, name,
                f"must be a positive integer, got {value!r}")


def _check_json_type(owner: str, key: str, value, default) -> None:
    """A config.json value must have the JSON type of the field's default (an int for an int
    field, a number for a float field, ...): a list where a size belongs fails here, named."""
    if value is None or default is None or default is dataclasses.MISSING:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{owner}.{key}: must be {type(default).__name__}, got {value!r}")


class ComponentConfig:
    """Behaviour shared by the per-kind configs (frozen dataclasses)."""

    if TYPE_CHECKING:
        # Every subclass is a dataclass with a ``name`` field; this tells the type checker so
        # (dataclasses.asdict/fields/replace accept it, ``cls(name=..., **fields)`` type-checks).
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
        name: str

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- config.json (the text_config / vision_config sub-dicts) -----------------------------
    @classmethod
    def from_hf(cls, data: Mapping[str, Any], name: str):
        """Build from a Hugging Face sub-config: the keys this class knows, unknown keys ignored
        (transformers writes many that do not change the model)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
        values = {k: v for k, v in data.items() if k in fields}
        for key, value in values.items():
            _check_json_type(cls.__name__, key, value, fields[key].default)
        return cls(name=name, **values)

    def to_hf(self, model_type: str) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None}
        out["model_type"] = model_type
        return out


# --------------------------------------------------------------------------------------
# Vision encoder


@dataclass(frozen=True)
class VisionConfig(ComponentConfig):
    """A ViT-style vision encoder over square tiles of ``image_size`` pixels (SigLIP defaults)."""

    name: str = "siglip"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        c = type(self).__name__
        require_positive_ints(self, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_channels", "image_size", "patch_size"))
        require(self.hidden_size % self.num_attention_heads == 0, c, "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        # Not required to divide: SmolVLM-Instruct has 384-px tiles and 14-px patches (a 27x27
        # grid; the strided conv ignores the last 6 pixels), as transformers allows.
        require(self.image_size >= self.patch_size, c, "image_size",
                f"{self.image_size} is smaller than patch_size={self.patch_size}")
        require_finite(self, "layer_norm_eps")
        require(isinstance(self.hidden_act, str), c, "hidden_act", f"must be a string, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2


# --------------------------------------------------------------------------------------
# Connector


@dataclass(frozen=True)
class ConnectorConfig(ComponentConfig):
    """Maps vision hidden states [N, P, in_dim] to text embeddings [N, P/s², out_dim].

    ``in_dim``/``out_dim`` of 0 mean "take them from the vision encoder and the decoder";
    ``VLMConfig`` fills them in and checks explicit values against its neighbours.
    ``hidden_dim`` is used by connectors with an inner layer (0: same as out_dim).
    """

    name: str = "pixel_shuffle"
    scale_factor: int = 2
    in_dim: int = 0
    out_dim: int = 0
    hidden_dim: int = 0

    def __post_init__(self):
        require_positive_ints(self, ("scale_factor",))
        for f in ("in_dim", "out_dim", "hidden_dim"):
            value = getattr(self, f)
            require(isinstance(value, int) and value >= 0, "ConnectorConfig", f,
                    f"must be a non-negative integer, got {value!r}")


# --------------------------------------------------------------------------------------
# Decoder


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig(ComponentConfig):
    """A causal decoder-only language model (Llama-style by default).

    ``rope_scaling`` is None or a dict like transformers' ``rope_parameters`` minus
    ``rope_theta`` (e.g. ``{"rope_type": "llama3", "factor": 8.0, ...}``).
    """

    name: str = "llama3"
    vocab_size: int = 49280
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self):
        c = type(self).__name__
        require_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        if self.head_dim == 0:
            require(self.hidden_size % self.num_attention_heads == 0, c, "hidden_size",
                    f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        require(self.head_dim % 2 == 0, c, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        require(self.num_attention_heads % self.num_key_value_heads == 0, c, "num_attention_heads",
                f"{self.num_attention_heads} is not divisible by num_key_value_heads={self.num_key_value_heads}")
        require_finite(self, "rope_theta")
        require_finite(self, "rms_norm_eps")
        require_bools(self, ("tie_word_embeddings", "attention_bias", "mlp_bias"))
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            ids = getattr(self, name)
            ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
            require(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids), c,
                    name, f"must be None or token ids in [0, {self.vocab_size}), got {getattr(self, name)!r}")
        require(self.hidden_act in ("silu", "gelu", "gelu_pytorch_tanh"), c, "hidden_act",
                f"unsupported activation {self.hidden_act!r} (silu, gelu, gelu_pytorch_tanh)")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, data: Mapping[str, Any], name: str):
        """Both rope layouts transformers has used: ``rope_theta`` + ``rope_scaling`` (older) and the
        ``rope_parameters`` dict that carries ``rope_theta`` inside it (newer)."""
        rope = data.get("rope_parameters")
        if rope is None:
            rope = data.get("rope_scaling") or {}
            if not isinstance(rope, Mapping):
                raise ValueError(f"{cls.__name__}.rope_scaling: must be an object or null, got {rope!r}")
            rope = dict(rope)
            if "rope_theta" in data:
                rope["rope_theta"] = data["rope_theta"]
        if not isinstance(rope, Mapping):
            raise ValueError(f"{cls.__name__}.rope_parameters: must be an object, got {rope!r}")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        fields = {k: v for k, v in data.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
        if fields.get("head_dim") is None:
            fields.pop("head_dim", None)
        if "rope_theta" in rope:
            theta = rope["rope_theta"]
            if isinstance(theta, bool) or not isinstance(theta, (int, float)):
                raise ValueError(f"{cls.__name__}.rope_theta: must be a number, got {theta!r}")
            fields["rope_theta"] = float(theta)
        fields["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
        return super().from_hf(fields, name)

    def to_hf(self, model_type: str) -> dict:
        out = {k: v for k, v in super().to_hf(model_type).items() if k not in ("rope_theta", "rope_scaling")}
        out["rope_parameters"] = {"rope_theta": float(self.rope_theta), "rope_type": "default",
                                  **(self.rope_scaling or {})}
        return out


def _validate_rope_scaling(rs: dict) -> None:
    c = "DecoderConfig"
    require(isinstance(rs, dict), c, "rope_scaling", f"must be a dict or None, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    require(kind in ROPE_TYPES, c, "rope_scaling", f"unsupported rope_type {kind!r} ({', '.join(ROPE_TYPES)})")
    needed = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    for key in needed.get(kind, ()):
        require(key in rs, c, "rope_scaling", f"{kind} rope scaling needs {key!r}")
        value = rs[key]
        require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and value > 0, c, "rope_scaling", f"{key} must be a finite number > 0, got {value!r}")
    if kind == "llama3":
        require(rs["high_freq_factor"] > rs["low_freq_factor"], c, "rope_scaling",
                "high_freq_factor must exceed low_freq_factor")


# --------------------------------------------------------------------------------------
# The whole model

_DEFAULTS: dict[str, type[ComponentConfig]] = {"vision": VisionConfig, "connector": ConnectorConfig,
                                               "decoder": DecoderConfig}


def _default_name(kind: str) -> str:
    """The component a slot gets when its config names none: the default config class's ``name``."""
    return cast(str, _DEFAULTS[kind].__dataclass_fields__["name"].default)


def component_config(kind: str, value: Any):
    """A slot's config from a config object or a dict (built with its component's config class);
    an instance of the wrong class for its component is an error naming both."""
    base = _DEFAULTS[kind]
    if not isinstance(value, (Mapping, base)):
        raise TypeError(f"VLMConfig.{kind}: expects a {base.__name__} (or a subclass, or a dict of its fields), got "
                        f"{type(value).__name__}")
    default_name = _default_name(kind)
    name = value.get("name", default_name) if isinstance(value, Mapping) else value.name
    try:
        entry = registry.get(kind, name)
    except KeyError:
        if isinstance(value, Mapping):
            raise
        return value  # an unknown name fails when the model is built, with the list of known ones
    if isinstance(value, Mapping) or value is None:
        return registry.make_config(entry, value)
    cls = entry.config_class
    if cls is not None and not isinstance(value, cls):
        raise TypeError(f"VLMConfig.{kind}: {kind} component {name!r} takes a {cls.__name__}, got "
                        f"{type(value).__name__}; build it with {cls.__name__}(...) or "
                        f"registry.config_class({kind!r}, {name!r})")
    return value


@dataclass(frozen=True)
class VLMConfig(ComponentConfig):
    """Everything needed to assemble a VLM: one config per part, plus the glue."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int = 49190

    def __post_init__(self):
        for kind in _DEFAULTS:
            object.__setattr__(self, kind, component_config(kind, getattr(self, kind)))
        self._resolve_connector_dims()
        grid = _vision_grid(self.vision)
        s = self.connector.scale_factor
        if grid is not None:
            require(grid % s == 0, "VLMConfig", "connector.scale_factor",
                    f"the vision patch grid {grid}x{grid} (image_size {self.vision.image_size} / patch_size "
                    f"{self.vision.patch_size}) is not divisible by scale_factor {s}")
        require(isinstance(self.image_token_id, int) and 0 <= self.image_token_id < self.decoder.vocab_size,
                "VLMConfig", "image_token_id",
                f"{self.image_token_id} is outside the decoder vocabulary (vocab_size {self.decoder.vocab_size})")

    def _resolve_connector_dims(self) -> None:
        c = self.connector
        for side, kind, what in (("in_dim", "vision", "vision encoder"), ("out_dim", "decoder", "decoder")):
            given, neighbour = getattr(c, side), getattr(self, kind)
            dim = neighbour.hidden_size
            require(not given or given == dim, "VLMConfig", f"connector.{side}",
                    f"{given} does not match the {what}'s hidden_size {dim} (connector {c.name!r} {side} {given} "
                    f"vs {kind} {neighbour.name!r} hidden_size {dim})")
        object.__setattr__(self, "connector", dataclasses.replace(c, in_dim=self.vision.hidden_size,
                                                                  out_dim=self.decoder.hidden_size))

    def replace(self, **changes):
        """A copy with some fields changed. Connector dims follow a changed vision/decoder."""
        if ("vision" in changes or "decoder" in changes) and "connector" not in changes:
            changes["connector"] = dataclasses.replace(self.connector, in_dim=0, out_dim=0)
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "VLMConfig":
        """Per-component fields (``{"decoder": {"hidden_size": 256}}``) and top-level fields
        replaced; an unknown field is an error naming it."""
        overrides = dict(overrides)
        parts = {}
        for kind in _DEFAULTS:
            if kind in overrides:
                part = getattr(self, kind)
                parts[kind] = registry.make_config(registry.get(kind, part.name), part, overrides.pop(kind))
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"VLMConfig: unknown field(s) {unknown}")
        return self.replace(**parts, **overrides) if parts or overrides else self

    # ---- derived quantities -----------------------------------------------------------
    @property
    def scale_factor(self) -> int:
        return self.connector.scale_factor

    # ---- transformers' names (read-only aliases onto the component configs) ----------------
    model_type = HF_MODEL_TYPES[0]
    is_encoder_decoder = False
    architectures = ("Idefics3ForConditionalGeneration",)
    text_config = property(lambda self: self.decoder, doc="transformers' name for the decoder config")
    vision_config = property(lambda self: self.vision, doc="transformers' name for the vision config")
    vocab_size = property(lambda self: self.decoder.vocab_size)
    hidden_size = property(lambda self: self.decoder.hidden_size)
    max_position_embeddings = property(lambda self: self.decoder.max_position_embeddings)
    tie_word_embeddings = property(lambda self: self.decoder.tie_word_embeddings)
    pad_token_id = property(lambda self: self.decoder.pad_token_id)
    bos_token_id = property(lambda self: self.decoder.bos_token_id)
    eos_token_id = property(lambda self: self.decoder.eos_token_id)

    def get_text_config(self, decoder: bool | None = None):
        return self.decoder

    def to_json_string(self, use_diff: bool = True) -> str:
        """config.json's text (transformers' method; always the full dict)."""
        return json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n"

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile, ``(image_size // patch)² / scale²``: the one owner of this number
        (the Processor takes it from here when it loads a checkpoint)."""
        grid = _vision_grid(self.vision)
        if grid is None:
            return getattr(self.vision, "num_image_tokens")  # custom vision configs may say it themselves
        return (grid // self.connector.scale_factor) ** 2

    @property
    def component_names(self) -> dict:
        return {kind: getattr(self, kind).name for kind in _DEFAULTS}

    @property
    def is_plain_idefics3(self) -> bool:
        return self.component_names == PLAIN_IDEFICS3

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **changes) -> "VLMConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        cfg = cls.from_dict(copy.deepcopy(PRESETS[name]))
        return cfg.replace(**changes) if changes else cfg

    def to_dict(self) -> dict:
        return {kind: getattr(self, kind).to_dict() for kind in _DEFAULTS} | {"image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "VLMConfig":
        return cls(**data)

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VLMConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            file = os.path.join(files.readable_directory(path, "checkpoint directory"), "config.json")
        else:
            file = path
        data = files.read_json_object(file, "config.json")
        try:
            return cls.from_hf_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file}: {exc}") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        files.write_text(os.path.join(path, "config.json"), json.dumps(self.to_hf_dict(), indent=2, sort_keys=True)
                         + "\n")

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "VLMConfig":
        if not isinstance(data, Mapping):
            raise ValueError("config.json must hold a JSON object")
        if data.get("model_type") not in HF_MODEL_TYPES:
            raise ValueError(f"model_type: expected 'idefics3' (or 'smolvlm'), got {data.get('model_type')!r}")
        for key in ("vision_config", "text_config"):
            if not isinstance(data.get(key), Mapping):
                raise ValueError(f"{key}: missing or not an object")
        extra = _hf_object(data, EXTRA_KEY)
        names = _hf_object(extra, "components", EXTRA_KEY)
        for kind, name in names.items():
            if not isinstance(name, str):
                raise ValueError(f"{EXTRA_KEY}.components.{kind}: must be a component name, got {name!r}")
        vision = sub_config_from_hf("vision", data["vision_config"], names.get("vision"))
        decoder = sub_config_from_hf("decoder", data["text_config"], names.get("decoder"))
        conn_entry = registry.get("connector", names.get("connector", "pixel_shuffle"))
        conn_fields = {**_hf_object(extra, "connector", EXTRA_KEY), "scale_factor": _hf_int(data, "scale_factor", 2)}
        connector = registry.make_config(conn_entry, conn_fields)
        return cls(vision=vision, connector=connector, decoder=decoder,
                   image_token_id=_hf_int(data, "image_token_id", 128257))

    def to_hf_dict(self) -> dict:
        out = {
            "architectures": ["Idefics3ForConditionalGeneration"],
            "model_type": HF_MODEL_TYPES[0],
            "image_token_id": self.image_token_id,
            "scale_factor": self.connector.scale_factor,
            "tie_word_embeddings": self.decoder.tie_word_embeddings,
            "vision_config": sub_config_to_hf("vision", self.vision),
            "text_config": sub_config_to_hf("decoder", self.decoder),
        }
        if not self.is_plain_idefics3:
            conn = {k: v for k, v in dataclasses.asdict(self.connector).items()
                    if k not in ("name", "scale_factor", "in_dim", "out_dim")}
            out[EXTRA_KEY] = {"components": self.component_names, "connector": conn}
        return out


def hf_model_types(entry: registry.Entry) -> tuple[str, ...]:
    """The Hugging Face model_types a registered component reads (the first is the one written)."""
    return tuple(entry.hf.get("model_types", ()))


def component_for_model_type(kind: str, model_type: str | None, default: str) -> str:
    """The registered ``kind`` component whose ``hf`` metadata names ``model_type``."""
    if model_type is None:
        return default
    for entry in registry.entries(kind):
        if model_type in hf_model_types(entry):
            return entry.name
    return default


def _hf_object(data: Mapping[str, Any], key: str, parent: str | None = None) -> Mapping[str, Any]:
    """An optional nested object of config.json ({} when absent)."""
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{parent + '.' if parent else ''}{key}: must be an object, got {type(value).__name__}")
    return value


def _hf_int(data: Mapping[str, Any], key: str, default: int) -> int:
    """An integer field of config.json; 2.0 is read as 2, but 2.5, "2" or true are refused."""
    value = data.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: must be an integer, got {value!r}")
    return value


def sub_config_from_hf(kind: str, data: Mapping[str, Any], name: str | None = None):
    """A component config from a ``vision_config`` / ``text_config`` dict (or a standalone
    checkpoint's config.json); the component follows ``name`` or else the dict's model_type."""
    default = _default_name(kind)
    name = name or component_for_model_type(kind, data.get("model_type"), default)
    # a component's config class follows ComponentConfig (from_hf), like the defaults
    cls = cast("type[ComponentConfig]", registry.config_class(kind, name) or _DEFAULTS[kind])
    return cls.from_hf(data, name)


def sub_config_to_hf(kind: str, cfg) -> dict:
    types = hf_model_types(registry.get(kind, cfg.name)) if cfg.name in registry.list_components(kind) else ()
    return cfg.to_hf(types[0] if types else cfg.name)


def _vision_grid(vision) -> int | None:
    image_size = getattr(vision, "image_size", None)
    patch = getattr(vision, "patch_size", None)
    if image_size is None or patch is None:
        return None
    return image_size // patch


__all__ = ["VisionConfig", "ConnectorConfig", "DecoderConfig", "VLMConfig", "ComponentConfig"]
