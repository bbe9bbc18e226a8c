"""Train a small byte-level BPE tokenizer that carries the Idefics3 special tokens.

Byte-level, so any text (including multi-byte characters) round-trips; the image tags are
single special tokens, laid out like SmolVLM-256M's tokenizer (``<global-img>`` and one
``<row_r_col_c>`` token per tile position), so prompt expansion stays short.
"""

from __future__ import annotations

from collections.abc import Iterable

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
PAD = "<pad>"
FAKE_IMAGE = "<fake_token_around_image>"
IMAGE = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
GLOBAL_IMAGE = "<global-img>"


def special_tokens(max_grid: int = 6) -> list[str]:
    """Special tokens in id order: end-of-text 0, im_start 1, pad 2, then the image tags."""
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]
    return [END_OF_TEXT, IM_START, PAD, FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE, *tiles]


def train_tokenizer(lines: Iterable[str], vocab_size: int = 512, max_grid: int = 6):
    """A `tokenizers.Tokenizer` trained on ``lines`` with the special tokens of ``special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(max_grid),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(list(lines), trainer)
    return tokenizer
