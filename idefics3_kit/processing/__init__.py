"""Processing: images and text in, the model's batch out, the way transformers' Idefics3Processor does it.

- ``processor``: ``Processor`` (splitter + tokenizer + prompt expansion + chat template)
- ``batch``: ``BatchFeature``, the dict both return (``return_tensors`` "pt", "np" or None)
- ``images``: decoding and conversion of any image to uint8 RGB
- ``tokenizer``: ``TextTokenizer``, the ``tokenizers`` library configured like transformers' fast tokenizer
- ``chat``: chat templates rendered as transformers renders them
- ``picture``: a picture of how an image is split into tiles
"""

from .batch import BatchFeature
from .processor import Processor
from .tokenizer import TextTokenizer

__all__ = ["BatchFeature", "Processor", "TextTokenizer"]
