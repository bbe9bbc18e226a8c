"""Configuration: one frozen dataclass per component kind, composed into ``VLMConfig``.

Each component config carries ``name``, the registry name of the component that builds it,
so a config alone says how to assemble the model. ``VLMConfig`` reads and writes Hugging
Face ``config.json`` files (``model_type: idefics3``); a variant whose parts are not the
Idefics3 ones records their names under the extra key ``idefics3_kit`` so that it loads
back into the same parts, while a plain Idefics3 config stays byte-compatible with
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

HF_MODEL_TYPE = "idefics3"
EXTRA_KEY = "idefics3_kit"  # where non-Idefics3 component names live in config.json


def _require(cond: bool, config: str, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{config}.{field_name}: {message}")


class _Replaceable:
    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Vision encoder


@dataclass(frozen=True)
class VisionConfig(_Replaceable):
    """A ViT-style vision encoder over square tiles of ``image_size`` pixels."""

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
        c = "VisionConfig"
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_channels", "image_size", "patch_size"):
            _require(isinstance(getattr(self, f), int) and getattr(self, f) > 0, c, f,
                     f"must be a positive integer, got {getattr(self, f)!r}")
        _require(self.hidden_size % self.num_attention_heads == 0, c, "hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        # Not required to divide: SmolVLM-Instruct has 384-px tiles and 14-px patches (a 27x27
        # grid; the strided conv ignores the last 6 pixels), as transformers allows.
        _require(self.image_size >= self.patch_size, c, "image_size",
                 f"{self.image_size} is smaller than patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2


@dataclass(frozen=True)
class ClipVisionConfig(VisionConfig):
    """CLIP ViT vision tower (transformers' CLIPVisionModel); defaults: openai/clip-vit-base-patch16.

    ``feature_layer`` picks the hidden state handed to the connector, indexed like transformers'
    ``hidden_states`` tuple (0: embeddings after pre_layrnorm, k: output of layer k): -1 is
    ``last_hidden_state`` (the default), -2 the penultimate layer that LLaVA uses. The class
    token is always dropped, so the connector sees the square patch grid. ``post_layernorm``
    (applied by transformers only to the pooled class token) is kept for checkpoints but not
    used for the features. ``projection_dim`` is carried for config.json round trips only.
    ``interpolate_pos_encoding``: tiles of another size than ``image_size`` get bicubically
    resized position embeddings, as transformers does when called with
    ``interpolate_pos_encoding=True``; False refuses them.
    """

    name: str = "clip"
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 512
    feature_layer: int = -1
    interpolate_pos_encoding: bool = True

    def __post_init__(self):
        super().__post_init__()
        n = self.num_hidden_layers
        _require(isinstance(self.feature_layer, int) and -(n + 1) <= self.feature_layer <= n,
                 "ClipVisionConfig", "feature_layer",
                 f"must index the {n + 1} hidden states (-{n + 1}..{n}), got {self.feature_layer!r}")

    @property
    def num_layers_run(self) -> int:
        """How many encoder layers produce the selected hidden state."""
        return self.feature_layer % (self.num_hidden_layers + 1)


# --------------------------------------------------------------------------------------
# Connector


@dataclass(frozen=True)
class ConnectorConfig(_Replaceable):
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
        _require(isinstance(self.scale_factor, int) and self.scale_factor > 0, "ConnectorConfig",
                 "scale_factor", f"must be a positive integer, got {self.scale_factor!r}")
        for f in ("in_dim", "out_dim", "hidden_dim"):
            _require(isinstance(getattr(self, f), int) and getattr(self, f) >= 0, "ConnectorConfig", f,
                     f"must be a non-negative integer, got {getattr(self, f)!r}")


# --------------------------------------------------------------------------------------
# Decoder


@dataclass(frozen=True)
class DecoderConfig(_Replaceable):
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
        c = "DecoderConfig"
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            _require(isinstance(getattr(self, f), int) and getattr(self, f) > 0, c, f,
                     f"must be a positive integer, got {getattr(self, f)!r}")
        if self.head_dim == 0:
            _require(self.hidden_size % self.num_attention_heads == 0, c, "hidden_size",
                     f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _require(self.head_dim % 2 == 0, c, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, c, "num_attention_heads",
                 f"{self.num_attention_heads} is not divisible by num_key_value_heads={self.num_key_value_heads}")
        _require(self.rope_theta > 0, c, "rope_theta", f"must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)
        if self.hidden_act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"DecoderConfig.hidden_act: unsupported activation {self.hidden_act!r}")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class Qwen2DecoderConfig(DecoderConfig):
    """Qwen2 / Qwen2.5 decoder (transformers' Qwen2ForCausalLM).

    Defaults are Qwen2.5-0.5B-Instruct's config.json (special-token ids left None, as in
    transformers' Qwen2Config: they come with the checkpoint). The architecture differs from Llama only
    in fixed biases (q/k/v projections with bias, o_proj and MLP without), so
    ``attention_bias``/``mlp_bias`` must stay False. Sliding-window attention is not
    implemented: a config in which some layer would use it (``use_sliding_window`` with
    ``max_window_layers < num_hidden_layers``) is refused.
    """

    name: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    use_sliding_window: bool = False
    sliding_window: int | None = None  # the checkpoint says 32768; transformers drops it when sliding is off
    max_window_layers: int = 21

    def __post_init__(self):
        super().__post_init__()
        c = "Qwen2DecoderConfig"
        _require(not self.attention_bias, c, "attention_bias",
                 "Qwen2 always has q/k/v biases and no o_proj bias; leave attention_bias False")
        _require(not self.mlp_bias, c, "mlp_bias", "Qwen2's MLP has no biases; leave mlp_bias False")
        sliding = [i for i in range(self.num_hidden_layers) if i >= self.max_window_layers]
        _require(not (self.use_sliding_window and self.sliding_window and sliding), c, "use_sliding_window",
                 f"sliding-window attention is not implemented (layers {sliding[:3]}... would use a window of "
                 f"{self.sliding_window}); set use_sliding_window=False")


def _validate_rope_scaling(rs: dict) -> None:
    if not isinstance(rs, dict):
        raise ValueError(f"DecoderConfig.rope_scaling: must be a dict or None, got {type(rs).__name__}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rs:
                raise ValueError(f"DecoderConfig.rope_scaling: llama3 rope scaling needs {key!r}")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ValueError("DecoderConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")
        return
    if kind == "linear":
        if "factor" not in rs:
            raise ValueError("DecoderConfig.rope_scaling: linear rope scaling needs 'factor'")
        return
    raise ValueError(f"DecoderConfig.rope_scaling: unsupported rope_type {kind!r} (default, linear, llama3)")


# --------------------------------------------------------------------------------------
# The whole model


def _component_config(kind: str, value: Any, default_cls: type):
    """Accept a config object or a dict; a dict is built with its component's config class."""
    if isinstance(value, dict):
        from . import registry

        name = value.get("name", default_cls.__dataclass_fields__["name"].default)
        cls = registry.config_class(kind, name) or default_cls
        return cls(**value)
    return value


def _check_component_config(kind: str, cfg: Any) -> None:
    """A slot's config must be an instance of its component's registered config class."""
    from . import registry

    name = getattr(cfg, "name", None)
    try:
        cls = registry.config_class(kind, name)
    except KeyError:
        return  # an unknown name fails when the model is built, with the list of known ones
    if cls is not None and not isinstance(cfg, cls):
        raise TypeError(f"VLMConfig.{kind}: {kind} component {name!r} takes a {cls.__name__}, got "
                        f"{type(cfg).__name__}; build it with {cls.__name__}(...) or "
                        f"registry.config_class({kind!r}, {name!r})")


@dataclass(frozen=True)
class VLMConfig(_Replaceable):
    """Everything needed to assemble a VLM: one config per part, plus the glue."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: int = 49190

    def __post_init__(self):
        object.__setattr__(self, "vision", _component_config("vision", self.vision, VisionConfig))
        object.__setattr__(self, "connector", _component_config("connector", self.connector, ConnectorConfig))
        object.__setattr__(self, "decoder", _component_config("decoder", self.decoder, DecoderConfig))
        for kind in ("vision", "connector", "decoder"):
            _check_component_config(kind, getattr(self, kind))
        self._resolve_connector_dims()
        grid = _vision_grid(self.vision)
        s = self.connector.scale_factor
        if grid is not None:
            _require(grid % s == 0, "VLMConfig", "connector.scale_factor",
                     f"the vision patch grid {grid}x{grid} (image_size {self.vision.image_size} / patch_size "
                     f"{self.vision.patch_size}) is not divisible by scale_factor {s}")
        _require(0 <= self.image_token_id < self.decoder.vocab_size, "VLMConfig", "image_token_id",
                 f"{self.image_token_id} is outside the decoder vocabulary (vocab_size {self.decoder.vocab_size})")

    def _resolve_connector_dims(self) -> None:
        c = self.connector
        vis_dim = self.vision.hidden_size
        txt_dim = self.decoder.hidden_size
        if c.in_dim and c.in_dim != vis_dim:
            raise ValueError(f"VLMConfig.connector.in_dim: {c.in_dim} does not match the vision encoder's "
                             f"hidden_size {vis_dim} (connector {c.name!r} in_dim {c.in_dim} vs vision "
                             f"{self.vision.name!r} hidden_size {vis_dim})")
        if c.out_dim and c.out_dim != txt_dim:
            raise ValueError(f"VLMConfig.connector.out_dim: {c.out_dim} does not match the decoder's "
                             f"hidden_size {txt_dim} (connector {c.name!r} out_dim {c.out_dim} vs decoder "
                             f"{self.decoder.name!r} hidden_size {txt_dim})")
        object.__setattr__(self, "connector", dataclasses.replace(c, in_dim=vis_dim, out_dim=txt_dim))

    def replace(self, **changes):
        """A copy with some fields changed. Connector dims follow a changed vision/decoder."""
        if ("vision" in changes or "decoder" in changes) and "connector" not in changes:
            changes["connector"] = dataclasses.replace(self.connector, in_dim=0, out_dim=0)
        return dataclasses.replace(self, **changes)

    # ---- derived quantities -----------------------------------------------------------
    @property
    def scale_factor(self) -> int:
        return self.connector.scale_factor

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile: (image_size / patch)² / scale²."""
        grid = _vision_grid(self.vision)
        if grid is None:
            return getattr(self.vision, "num_image_tokens")  # custom vision configs may say it themselves
        return (grid // self.connector.scale_factor) ** 2

    @property
    def component_names(self) -> dict:
        return {"vision": self.vision.name, "connector": self.connector.name, "decoder": self.decoder.name}

    @property
    def is_plain_idefics3(self) -> bool:
        return self.component_names == {"vision": "siglip", "connector": "pixel_shuffle", "decoder": "llama3"}

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **changes) -> "VLMConfig":
        from .presets import PRESETS

        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        cfg = PRESETS[name]()
        return cfg.replace(**changes) if changes else cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "VLMConfig":
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json found at {file}")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from None
        try:
            return cls.from_hf_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{file}: {exc}") from None

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict) -> "VLMConfig":
        from . import hf_config

        return hf_config.vlm_config_from_hf(data)

    def to_hf_dict(self) -> dict:
        from . import hf_config

        return hf_config.vlm_config_to_hf(self)

    def to_dict(self) -> dict:
        return {
            "vision": self.vision.to_dict(),
            "connector": self.connector.to_dict(),
            "decoder": self.decoder.to_dict(),
            "image_token_id": self.image_token_id,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "VLMConfig":
        return cls(**data)


def _vision_grid(vision) -> int | None:
    image_size = getattr(vision, "image_size", None)
    patch = getattr(vision, "patch_size", None)
    if image_size is None or patch is None:
        return None
    return image_size // patch


def tokens_per_tile(image_size: int, patch_size: int, scale_factor: int) -> int:
    """HF's formula int((image_size // patch)² / scale²)."""
    return int(((image_size // patch_size) ** 2) / (scale_factor ** 2))


__all__ = ["VisionConfig", "ClipVisionConfig", "ConnectorConfig", "DecoderConfig", "Qwen2DecoderConfig", "VLMConfig",
           "tokens_per_tile"]
