"""Hugging Face files in and out, knowing no model.

- ``weights``: safetensors checkpoints: tensor names, tying, sharding, loading, saving (also of
  wrapped models: LoRA merged, quantized weights dequantized, distributed ones gathered)
- ``parts``: single components from transformers checkpoints (``VLM.from_parts`` sources)

The ``config.json`` mapping is the configs' own file format and lives with them
(``idefics3_kit.config`` and each component's config class), so a plugin's config brings its own.
"""

from .parts import load_component, resolve_dtype
from .weights import CheckpointError

__all__ = ["CheckpointError", "load_component", "resolve_dtype"]
