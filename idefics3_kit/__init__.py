"""idefics3_kit: the Idefics3 vision-language model as swappable, registered parts."""

from . import ops, registry
from .config import (ClipVisionConfig, ConnectorConfig, DecoderConfig, Qwen2DecoderConfig, VisionConfig,
                     VLMConfig)
from .model import VLM, VLMOutput
from .processing import BatchFeature, ImagePlan, Processor
from .components.splitter import SplitterConfig

__version__ = "0.1.0"

__all__ = ["VLM", "VLMConfig", "VLMOutput", "VisionConfig", "ConnectorConfig", "DecoderConfig", "ClipVisionConfig",
           "Qwen2DecoderConfig", "Processor", "BatchFeature", "ImagePlan", "SplitterConfig", "ops", "registry",
           "__version__"]
