"""Tiny processor checkpoints written by transformers, and the synthetic images of reference §1.12.

``tiny_tokenizer`` builds a tokenizer without transformers (for tests that must not need it).

Nothing is downloaded: a small byte-level BPE tokenizer is trained on a few sentences, wrapped in
transformers' PreTrainedTokenizerFast and saved with an Idefics3Processor (PIL image backend).
Two tokenizer flavours mirror the real checkpoints:

- ``llama``: Llama-3-like, the post-processor adds ``<|begin_of_text|>``; ``<global-img>`` and the
  ``<row_r_col_c>`` tags are not tokens, so they are tokenized as text; ``\\n\\n`` merges to one token.
- ``smol``: SmolVLM-like, no BOS added; ``<global-img>`` and the 36 row/col tags are added tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# transformers' Idefics3 chat template (reference §2.5); the SmolVLM one starts with <|im_start|>.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOL_TEMPLATE = IDEFICS3_TEMPLATE.replace("<|begin_of_text|>", "<|im_start|>", 1)

# (longest_edge, tile, image_seq_len) of the three released checkpoints (reference §4)
REAL_GEOMETRIES = {"idefics3": (1456, 364, 169), "smolvlm": (1536, 384, 81), "smolvlm256m": (2048, 512, 64)}

CORPUS = [
    "In this image, we see a cat sitting on a red chair.\n\n",
    "User: What is this?<end_of_utterance>\nAssistant: A dog playing in the park.\n\n",
    "bla, bla, the rows and columns of tiles, global image.\n",
    "What do these images show? The first image shows the statue of Liberty in New York.\n\n",
]


def gradient_image(width: int, height: int):
    """Reference §1.12: R = floor(x·255/(W−1)), G = floor(y·255/(H−1)), B = 7·(x+y) mod 256."""
    from PIL import Image

    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    red = np.broadcast_to(x * 255 // max(width - 1, 1), (height, width))
    green = np.broadcast_to(y * 255 // max(height - 1, 1), (height, width))
    blue = (7 * (x + y)) % 256
    return Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)


def tiny_tokenizer(bos: bool = True):
    """A TextTokenizer built without transformers: byte-level BPE, <s> added as BOS when ``bos``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from idefics3_kit.processing.tokenizer import TextTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In this image, we see a cat.\n\n", "hello world\n"] * 20, trainer)
    return TextTokenizer(tok, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, add_bos_token=bos)


def make_tokenizer(flavour: str):
    """A transformers PreTrainedTokenizerFast around a freshly trained byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"],
                "smol": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[flavour]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    if flavour == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
                                       padding_side="left")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tags = ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left")
    fast.add_tokens(tags)
    return fast


def make_checkpoint(path, flavour: str = "llama", longest_edge: int = 1456, tile: int = 364,
                    image_seq_len: int = 3, splitting: bool = True, template: str | None = "default",
                    template_layout: str = "jinja") -> str:
    """Save an Idefics3Processor (PIL backend) checkpoint; returns its path.

    template_layout: "jinja" (chat_template.jinja), "json" (chat_template.json, the older layout),
    "tokenizer" (only tokenizer_config.json's chat_template), "none" (no template at all).
    """
    from transformers import Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    if template == "default":
        template = IDEFICS3_TEMPLATE if flavour == "llama" else SMOL_TEMPLATE
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": longest_edge},
                                                max_image_size={"longest_edge": tile},
                                                do_image_splitting=splitting)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=make_tokenizer(flavour),
                                  image_seq_len=image_seq_len,
                                  chat_template=template if template_layout in ("jinja", "json") else None)
    processor.save_pretrained(str(path))
    if template_layout == "json":
        (path / "chat_template.jinja").unlink()
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    elif template_layout == "tokenizer":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def split_legacy_layout(path) -> None:
    """Rewrite a v5 checkpoint into the hub's v4 layout: preprocessor_config.json + a small processor_config.json."""
    path = Path(path)
    config = json.loads((path / "processor_config.json").read_text())
    image = config.pop("image_processor")
    (path / "preprocessor_config.json").write_text(json.dumps({**image, "processor_class": "Idefics3Processor"}))
    (path / "processor_config.json").write_text(json.dumps(config))


def hf_processor(path):
    """transformers' processor for a checkpoint, pinned to the PIL image backend (reference §0 trap 1)."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    processor = Idefics3Processor.from_pretrained(os.fspath(path))
    assert isinstance(processor.image_processor, Idefics3ImageProcessorPil), type(processor.image_processor)
    return processor
