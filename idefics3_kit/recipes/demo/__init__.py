"""The demo recipe: a small VLM trained with this toolkit on synthetic shapes, shipped with the package.

- ``run``: the README's main job (``idefics3-kit demo``): ask the shipped model about images
- ``model``: the demo's processor (a trained tokenizer, small tiles), model config, answering, evaluation
- ``synthetic``: the synthetic visual questions (shapes, colours, counts, positions, words)
- ``tokenizer``: the byte-level BPE tokenizer builder with the Idefics3 special tokens
- ``training``: the synthetic data source, the demo model and its vision warm-up, registered with
  the trainer's sources on import
- ``assets/``: the trained checkpoint (``demo_model/``) and an example image
"""

from . import training  # noqa: F401  (registers the demo's data source, model and processor builders)
from .model import answer, build_processor, demo_model_config, evaluate, shipped_model_dir

__all__ = ["answer", "build_processor", "demo_model_config", "evaluate", "shipped_model_dir"]
