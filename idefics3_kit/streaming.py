"""Streaming text out of generation: incremental detokenization that is UTF-8 safe.

Byte-level BPE tokens can end in the middle of a multi-byte character (an emoji is often 2-4
tokens); decoding such a prefix gives U+FFFD. ``IncrementalDetokenizer`` holds text back until
the decoded tail no longer ends in U+FFFD, and decodes from a short window of recent tokens
(``prefix_offset``..end) so each step costs O(window), not O(generated).

Two forms:

- iterator: ``for text in model.stream(proc, **batch, max_new_tokens=64): print(text, end="")``
- callback: ``model.generate(**batch, streamer=TextStreamer(proc, callback=print_fn))``; the
  streamer receives each step's ids through ``put(ids [1])`` and ``end()``, like transformers'
  streamers.

The tokenizer is anything with ``decode(ids, skip_special_tokens=...)`` (a ``tokenizers.Tokenizer``),
or an object holding one as ``.tokenizer`` (the Processor).
"""

from __future__ import annotations

import torch

from .generation import generate_steps

REPLACEMENT = "\ufffd"


def _tokenizer_of(obj):
    """The ``tokenizers.Tokenizer`` inside a Processor, or the object itself."""
    inner = getattr(obj, "tokenizer", None)
    return inner if inner is not None and hasattr(inner, "decode") else obj


class IncrementalDetokenizer:
    """``push(id) -> str``: the new, complete text since the last call; ``flush()`` the rest."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = _tokenizer_of(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here (keeps context for leading-space rules)
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] has been emitted

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT) and full.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (a sequence that ended mid-character keeps its U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else ""


class TextStreamer:
    """Callback form: ``generate(..., streamer=TextStreamer(tok, callback))`` calls ``callback(text)``
    with each new piece of text of row 0 (batch size 1).

    Like transformers' streamers it receives the prompt first (``put(prompt [1, L])``), then each
    step's ids (``put(ids [1])``), then ``end()``. ``skip_prompt`` (default True here, False in
    transformers' TextStreamer) leaves the prompt's text out."""

    def __init__(self, tokenizer, callback=None, skip_special_tokens: bool = True, skip_prompt: bool = True):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.callback = callback if callback is not None else (lambda t: print(t, end="", flush=True))
        self.skip_prompt = skip_prompt
        self.next_tokens_are_prompt = True

    def put(self, ids: torch.Tensor) -> None:
        if ids.dim() > 1 and ids.shape[0] > 1:
            raise ValueError(f"TextStreamer streams one sequence; got a batch of {ids.shape[0]}")
        ids = ids.reshape(-1)
        is_prompt, self.next_tokens_are_prompt = self.next_tokens_are_prompt, False
        if is_prompt and self.skip_prompt:
            return
        if not is_prompt and ids.numel() != 1:
            raise ValueError(f"TextStreamer streams one sequence; got {ids.numel()} ids per step (batch > 1)")
        text = "".join(self.detok.push(int(i)) for i in ids)
        if text:
            self.callback(text)

    def end(self) -> None:
        text = self.detok.flush()
        if text:
            self.callback(text)


def stream(model, tokenizer, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
           skip_special_tokens: bool = True, **kwargs):
    """Iterator of text pieces for one prompt (batch size 1); pieces never split a character."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"stream takes one prompt (batch size 1), got a batch of {input_ids.shape[0]}; "
                         "use generate for batches")
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    steps = generate_steps(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, **kwargs)
    _step(steps)  # the prompt
    while (nxt := _step(steps)) is not None:
        text = detok.push(int(nxt[0]))
        if text:
            yield text
    rest = detok.flush()
    if rest:
        yield rest


def _step(steps):
    """Advance the decoding loop under inference mode (not held while the caller runs)."""
    with torch.inference_mode():
        return next(steps, None)
