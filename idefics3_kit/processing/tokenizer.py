"""Text tokenizer on the ``tokenizers`` library alone, configured like transformers' fast tokenizer.

transformers is not a runtime dependency, so the pieces of its ``PreTrainedTokenizerFast``
setup that change token ids are reproduced here from the checkpoint's own files:

- ``tokenizer.json`` is the pipeline (normalizer, pre-tokenizer, model, post-processor, decoder).
- ``tokenizer_config.json`` names the special tokens (bos/eos/pad/unk + extra ones); any not yet in
  the added vocabulary is added as a special token.
- Whether a BOS/EOS is added is decided by tokenizer.json's post-processor alone: transformers
  5.24 drops ``add_bos_token``/``add_eos_token`` from tokenizer_config.json whenever a
  tokenizer.json exists, so they are ignored here too. Passing ``add_bos_token``/``add_eos_token``
  to the constructor rebuilds the post-processor as ``[bos] $A [eos]`` (transformers' rule for
  explicit arguments), and ``save`` writes that post-processor into tokenizer.json.
- Decoding skips special tokens on request; ``clean_up_tokenization_spaces`` is honoured except for
  BPE models (transformers skips it there too).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from .. import files

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: a special token must be a string or {{'content': ...}}, got {value!r}")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special-token facts transformers keeps beside it."""

    def __init__(self, backend, config: dict | None = None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None):
        from tokenizers import AddedToken

        self.backend = backend
        self.config = dict(config or {})
        self.special_tokens = {k: _token_content(self.config.get(k)) for k in NAMED_SPECIAL_TOKENS}
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # v5 may store named extras as a dict
            extra = list(extra.values())
        self.extra_special_tokens = [_token_content(t) for t in extra]
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in [*self.special_tokens.values(), *self.extra_special_tokens] if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._rebuild_post_processor(bool(add_bos_token), bool(add_eos_token))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "TextTokenizer":
        """Load ``tokenizer.json`` (+ optional ``tokenizer_config.json``) from a checkpoint folder."""
        from tokenizers import Tokenizer

        file = os.path.join(path, "tokenizer.json")
        if not os.path.lexists(file):
            raise ValueError(f"tokenizer.json not found in {path} (only fast tokenizers are supported: "
                             f"save the tokenizer with transformers' save_pretrained to create it)")
        files.regular_file(file, "tokenizer.json")
        try:
            backend = Tokenizer.from_file(file)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"tokenizer.json could not be loaded: {file}: {exc}") from None
        config = files.read_json_if_exists(os.path.join(path, "tokenizer_config.json"), "tokenizer_config.json")
        return cls(backend, config)

    def _rebuild_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """transformers' rule for explicit arguments: ``[bos:0] $A:0 [eos:0]``."""
        from tokenizers import processors

        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, self.backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    def add_special_tokens(self, tokens: Iterable[str]) -> None:
        """Register tokens as special (kept whole, skipped when decoding); existing ids are kept."""
        from tokenizers import AddedToken

        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        for t in tokens:
            if t not in self.extra_special_tokens:
                self.extra_special_tokens.append(t)

    # ---- facts ----------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._named_id("pad_token")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- encode / decode ------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return self.encodings(texts, add_special_tokens)[0]

    def encodings(self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None,
                  direction: str = "right") -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """(ids, character offsets) per text, optionally truncated to ``max_length`` tokens with the
        special tokens kept: the same steps as the library's own truncation (text tokens cut to
        leave room for the post-processor's tokens, then those added), without
        ``enable_truncation`` on the shared object. Special tokens have offsets (0, 0)."""
        if max_length is None:
            encoded = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        else:
            processor = self.backend.post_processor
            room = processor.num_special_tokens_to_add(False) if add_special_tokens and processor is not None else 0
            if max_length < room:
                raise ValueError(f"max_length={max_length} leaves no room for the {room} special tokens")
            encoded = []
            for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False):
                encoding.truncate(max_length - room, direction=direction)
                encoded.append(self.backend.post_process(encoding, add_special_tokens=add_special_tokens))
        return [e.ids for e in encoded], [list(e.offsets) for e in encoded]

    def encode_batch_truncated(self, texts: Sequence[str], add_special_tokens: bool, max_length: int,
                               direction: str = "right") -> list[list[int]]:
        """``encode_batch`` with truncation to ``max_length`` tokens, special tokens kept."""
        return self.encodings(texts, add_special_tokens, max_length, direction)[0]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._clean_up(text)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        texts = self.backend.decode_batch([list(s) for s in sequences], skip_special_tokens=skip_special_tokens)
        return [self._clean_up(t) for t in texts]

    def _clean_up(self, text: str) -> str:
        """transformers' legacy space clean-up, only when configured and never for BPE models."""
        if not self.config.get("clean_up_tokenization_spaces") or type(self.backend.model).__name__ == "BPE":
            return text
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)
        return text

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, directory: str, extra_config: dict | None = None) -> None:
        """tokenizer.json (post-processor included) + a tokenizer_config.json transformers loads."""
        files.write_text(os.path.join(directory, "tokenizer.json"), self.backend.to_str(pretty=True))
        config = {k: v for k, v in self.config.items()
                  if k not in ("add_bos_token", "add_eos_token", "added_tokens_decoder", "chat_template",
                               "additional_special_tokens", "extra_special_tokens", "tokenizer_file")}
        config.update(self.special_tokens)
        config["extra_special_tokens"] = list(self.extra_special_tokens)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(extra_config or {})
        files.write_json(os.path.join(directory, "tokenizer_config.json"), config, sort_keys=True, ensure_ascii=False)
