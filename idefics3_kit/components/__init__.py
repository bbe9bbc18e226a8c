"""The built-in components, one module per kind; importing this package registers them.

``idefics3_kit/__init__.py`` imports it, so every built-in is in the registry as soon as the
package is imported (timm's way); the registry itself imports nothing of ours.
"""

from . import connector, decoder, sampler, splitter, vision  # noqa: F401
from .decoder import KVCache, Qwen2DecoderConfig
from .splitter import SplitterConfig, TilePlan
from .vision import ClipVisionConfig

__all__ = ["ClipVisionConfig", "KVCache", "Qwen2DecoderConfig", "SplitterConfig", "TilePlan"]
