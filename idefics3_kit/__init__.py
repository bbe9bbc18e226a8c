"""idefics3_kit: the Idefics3 vision-language model as swappable, registered parts.

Importing the package registers the built-in components (``idefics3_kit.components``) before
anything looks them up; plugins load on the first lookup that misses.
"""

from . import components, ops, registry  # components first: importing it registers the built-ins
from .components import ClipVisionConfig, KVCache, Qwen2DecoderConfig, SplitterConfig, TilePlan
from .config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from .model import VLM, VLMOutput
from .processing import BatchFeature, Processor
from .version import __version__

__all__ = ["VLM", "VLMConfig", "VLMOutput", "VisionConfig", "ConnectorConfig", "DecoderConfig", "ClipVisionConfig",
           "Qwen2DecoderConfig", "KVCache", "Processor", "BatchFeature", "TilePlan", "SplitterConfig", "components",
           "ops", "registry", "__version__"]
