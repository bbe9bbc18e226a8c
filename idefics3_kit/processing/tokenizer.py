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
from typing import Iterable, Sequence, cast

from .. import files
from . import chat
from .batch import BatchEncoding, check_tensor_type

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# transformers' call arguments we do not produce, accepted at their neutral values only
_NEUTRAL_CALL_ARGUMENTS = {"return_token_type_ids": (None, False), "return_overflowing_tokens": (False,),
                           "return_special_tokens_mask": (False,), "return_offsets_mapping": (False,),
                           "return_length": (False,), "verbose": (True, False), "stride": (0,),
                           "is_split_into_words": (False,), "text_pair": (None,), "text_target": (None,)}


def _refuse_unsupported(arguments: dict) -> None:
    for key, value in arguments.items():
        if key not in _NEUTRAL_CALL_ARGUMENTS:
            raise TypeError(f"tokenizer call got an unexpected argument {key!r}")
        if value not in _NEUTRAL_CALL_ARGUMENTS[key]:
            raise ValueError(f"tokenizer call: {key}={value!r} is not supported (use transformers' tokenizer: "
                             "tokenizer.to_transformers())")


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
        named = {k: _token_content(self.config.get(k)) for k in NAMED_SPECIAL_TOKENS}
        self.special_tokens: dict[str, str] = {k: v for k, v in named.items() if v is not None}
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # v5 may store named extras as a dict
            extra = list(extra.values())
        # a None entry is not an added token: AddedToken(None) below refuses it, so all are str
        self.extra_special_tokens = cast("list[str]", [_token_content(t) for t in extra])
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

        bos = self.special_tokens.get("bos_token") if add_bos else None
        eos = self.special_tokens.get("eos_token") if add_eos else None
        single = f"{bos + ':0 ' if bos is not None else ''}$A:0{' ' + eos + ':0' if eos is not None else ''}"
        pair = (f"{single}{' ' + bos + ':1' if bos is not None else ''} "
                f"$B:1{' ' + eos + ':1' if eos is not None else ''}")
        specials = [(t, self.backend.token_to_id(t)) for t in (bos, eos) if t is not None]
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

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    sep_token = property(lambda self: self.special_tokens.get("sep_token"))
    cls_token = property(lambda self: self.special_tokens.get("cls_token"))
    mask_token = property(lambda self: self.special_tokens.get("mask_token"))
    bos_token_id = property(lambda self: self._named_id("bos_token"))
    eos_token_id = property(lambda self: self._named_id("eos_token"))
    unk_token_id = property(lambda self: self._named_id("unk_token"))
    pad_token_id = property(lambda self: self._named_id("pad_token"))
    sep_token_id = property(lambda self: self._named_id("sep_token"))
    cls_token_id = property(lambda self: self._named_id("cls_token"))
    mask_token_id = property(lambda self: self._named_id("mask_token"))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """bos/eos/unk/pad/... -> token (transformers' special_tokens_map)."""
        return dict(self.special_tokens)

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(self.extra_special_tokens)

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys([*self.special_tokens.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in self.all_special_tokens]

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' vocab_size); len() counts them."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    @property
    def model_max_length(self) -> int:
        value = self.config.get("model_max_length")
        return int(value) if isinstance(value, (int, float)) and value < 1e30 else int(1e30)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        """A token -> its id (the unk id, or None without one, when unknown); a list -> a list."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """An id -> its token; a list -> a list (special tokens left out on request)."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend.id_to_token(int(i)) for i in ids if int(i) not in special]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).tokens

    # ---- transformers' call ---------------------------------------------------------------------
    def __call__(self, text, add_special_tokens: bool = True, padding: bool | str = False, truncation: bool = False,
                 max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, padding_side: str | None = None,
                 pad_to_multiple_of: int | None = None, **unsupported) -> BatchEncoding:
        """transformers' tokenizer call for text (one string or a list): input_ids and attention_mask."""
        _refuse_unsupported(unsupported)
        check_tensor_type(return_tensors)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        limit = max_length if truncation and max_length is not None else None
        ids = self.encodings(texts, add_special_tokens, limit)[0]
        ids, mask = self.pad_ids(ids, padding, padding_side or self.padding_side, max_length, pad_to_multiple_of)
        out = BatchEncoding(input_ids=ids[0] if single and return_tensors is None else ids)
        if return_attention_mask:
            out["attention_mask"] = mask[0] if single and return_tensors is None else mask
        return out.convert_to_tensors(return_tensors)

    @property
    def padding_side(self) -> str:
        return self.__dict__.get("_padding_side") or self.config.get("padding_side") or "right"

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self.__dict__["_padding_side"] = side

    def pad_ids(self, ids: list[list[int]], padding, side: str, max_length: int | None = None,
                pad_to_multiple_of: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """(padded ids, attention masks) for rows of ids: transformers' padding arguments."""
        if padding in (False, "do_not_pad", None):
            return ids, [[1] * len(row) for row in ids]
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        target = max((len(r) for r in ids), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max(target, max_length)
        if pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        pad_id = self.pad_token_id
        if pad_id is None and any(len(r) < target for r in ids):
            raise ValueError("padding needs a pad token but tokenizer_config.json names none (pad_token); "
                             "set one or pass padding=False")
        out_ids, out_mask = [], []
        for row in ids:
            pad = target - len(row)
            out_ids.append([pad_id] * pad + list(row) if side == "left" else list(row) + [pad_id] * pad)
            out_mask.append([0] * pad + [1] * len(row) if side == "left" else [1] * len(row) + [0] * pad)
        return out_ids, out_mask

    def pad(self, encoded_inputs, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, return_tensors: str | None = None,
            padding_side: str | None = None) -> BatchEncoding:
        """transformers' ``pad``: a list of {"input_ids": [...]} (or a dict of lists) -> one padded batch."""
        if isinstance(encoded_inputs, dict):
            rows = encoded_inputs["input_ids"]
        else:
            rows = [item["input_ids"] for item in encoded_inputs]
        rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in rows]
        ids, mask = self.pad_ids(rows, padding, padding_side or self.padding_side, max_length, pad_to_multiple_of)
        return BatchEncoding(input_ids=ids, attention_mask=mask).convert_to_tensors(return_tensors)

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            return_tensors: str | None = None, return_dict: bool = False, **variables):
        """Render with the tokenizer's chat template (tokenizer_config.json's, or the processor's),
        then tokenize like transformers' tokenizer does (``tokenize=True`` by default here too)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has none); pass "
                             "chat_template= or use the Processor's apply_chat_template")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        prompts = [chat.render(template, c, add_generation_prompt, continue_final_message=continue_final_message,
                               **{**self.special_tokens, **variables})
                   for c in (conversation if batched else [conversation])]
        if not tokenize:
            return prompts if batched else prompts[0]
        add_special = not (self.bos_token is not None and prompts[0].startswith(self.bos_token))
        out = self(prompts if batched else prompts[0], add_special_tokens=add_special, return_tensors=return_tensors,
                   padding=batched)
        return out if return_dict else out["input_ids"]

    @property
    def chat_template(self) -> str | None:
        own = self.__dict__.get("_chat_template")
        return own if own is not None else self.config.get("chat_template") if isinstance(
            self.config.get("chat_template"), str) else None

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        self.__dict__["_chat_template"] = template

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, ...]:
        """tokenizer.json + tokenizer_config.json, atomically (other files in the folder stay)."""
        owned = ("tokenizer.json", "tokenizer_config.json")
        with files.atomic_directory(os.fspath(directory), lambda name: name in owned) as tmp:
            self.save(tmp, {"padding_side": self.padding_side})
        return tuple(os.path.join(os.fspath(directory), name) for name in owned)

    def to_transformers(self):
        """The same tokenizer as transformers' ``PreTrainedTokenizerFast`` (needs transformers), for
        tools that insist on that class."""
        try:
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            raise ImportError("to_transformers() needs transformers (pip install transformers)") from None
        return PreTrainedTokenizerFast(tokenizer_object=self.backend, padding_side=self.padding_side,
                                       chat_template=self.chat_template, **self.special_tokens,
                                       extra_special_tokens=list(self.extra_special_tokens))

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
