"""When a row stops: stopping criteria with transformers' signature and semantics.

A criterion is any callable ``(input_ids [B, T], scores, **kwargs) -> bool tensor [B]`` (or one
bool for the whole batch), exactly transformers' ``StoppingCriteria``; a list of them is
combined with OR (``StoppingCriteriaList``). transformers' own classes work as they are, and
nothing here imports transformers.

Built in (from the settings): the maximum length, ``max_time``, ``stop_strings`` (with a
tokenizer) and the end-of-sequence ids, in transformers' order.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch


class StoppingCriterion(Protocol):
    """What a criterion is: ``(input_ids, scores, **kwargs) -> bool tensor [B]`` (or one bool)."""

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor | bool: ...


class MaxLength:
    """Stops every row once ``input_ids`` holds ``max_length`` tokens (prompt included)."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = input_ids.shape[-1] >= self.max_length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class MaxTime:
    """Stops every row once ``max_time`` seconds have passed since generation started."""

    def __init__(self, max_time: float, start: float | None = None):
        self.max_time = max_time
        self.start = time.time() if start is None else start

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = time.time() - self.start > self.max_time
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosToken:
    """Stops a row whose last token is one of the end-of-sequence ids."""

    def __init__(self, eos_token_ids):
        self.eos_token_id = torch.as_tensor(list(eos_token_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        return torch.isin(input_ids[:, -1], self.eos_token_id.to(input_ids.device))


class StopStrings:
    """Stops a row when a stop string appears in its text overlapping the last token, transformers'
    ``StopStringCriteria`` rule: ["st", "op"] and ["st", "opera"] stop on "stop", ["stop", "at"]
    does not (the string was complete before the last token, so it was already seen).

    Like transformers, the match is on bytes: a byte-level BPE token that holds half of a UTF-8
    character still matches that half of a stop string. A token's bytes come from the tokenizer's
    vocabulary (byte-level and byte-fallback tokenizers) or from decoding it alone; only the last
    few tokens, enough to cover the longest stop string plus the last token, are looked at.
    """

    def __init__(self, tokenizer, stop_strings) -> None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=[...], tokenizer=processor)")
        self.token_bytes = token_bytes_function(tokenizer)
        self.stops = tuple(s.encode("utf-8") for s in stop_strings)
        self.longest = max(len(s) for s in self.stops)
        self.cache: dict[int, bytes] = {}

    def _bytes(self, token_id: int) -> bytes:
        if token_id not in self.cache:
            self.cache[token_id] = self.token_bytes(token_id)
        return self.cache[token_id]

    def row_stops(self, ids: list[int]) -> bool:
        last = self._bytes(ids[-1])
        tail, covered = [last], 0
        for token_id in reversed(ids[:-1]):
            if covered >= self.longest:
                break
            piece = self._bytes(token_id)
            tail.append(piece)
            covered += len(piece)
        text = b"".join(reversed(tail))
        last_start = len(text) - len(last)
        # an occurrence that ends after the last token starts (may run past the text's end: no)
        return any(stop in text[max(0, last_start - len(stop) + 1):] for stop in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        rows = [self.row_stops(row) for row in input_ids.tolist()]
        return torch.tensor(rows, dtype=torch.bool, device=input_ids.device)


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` of a Processor, our TextTokenizer, a transformers tokenizer, or itself."""
    for holder in (tokenizer, getattr(tokenizer, "tokenizer", None)):
        if holder is None:
            continue
        for name in ("backend", "backend_tokenizer", "_tokenizer"):
            inner = getattr(holder, name, None)
            if inner is not None and hasattr(inner, "id_to_token"):
                return inner
        if hasattr(holder, "id_to_token") and hasattr(holder, "decoder"):
            return holder
    return None


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2): each of the 256 bytes shown as one printable character."""
    shown = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = shown[:], 0
    for b in range(256):
        if b not in shown:
            shown.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(shown, chars)}


def token_bytes_function(tokenizer):
    """id -> the bytes the token stands for."""
    backend = _backend(tokenizer)
    kind = type(getattr(backend, "decoder", None)).__name__ if backend is not None else ""
    decoder_json = str(getattr(backend, "decoder", "")) if backend is not None else ""
    if kind == "ByteLevel" or (backend is not None and "ByteLevel" in decoder_json and "ByteFallback" not in decoder_json):
        table = _gpt2_unicode_to_byte()
        return lambda token_id: bytes(table[c] for c in (backend.id_to_token(token_id) or "") if c in table)
    if backend is not None and "ByteFallback" in decoder_json:
        def fallback(token_id: int) -> bytes:
            token = backend.id_to_token(token_id) or ""
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                return bytes([int(token[3:5], 16)])
            return token.replace("\u2581", " ").encode("utf-8")
        return fallback
    decode = getattr(getattr(tokenizer, "tokenizer", None), "decode", None) or getattr(tokenizer, "decode", None)
    if not callable(decode):
        raise TypeError(f"tokenizer must have decode(ids), got {type(tokenizer).__name__}")
    return lambda token_id: decode([token_id], skip_special_tokens=False).encode("utf-8")


class CriteriaList(list):
    """Criteria combined with OR, as transformers' ``StoppingCriteriaList``."""

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            result = criterion(input_ids, scores, **kwargs)
            done = done | torch.as_tensor(result, dtype=torch.bool, device=input_ids.device)
        return done

    @property
    def has_eos(self) -> bool:
        return any(hasattr(c, "eos_token_id") for c in self)


def build_criteria(settings, max_length: int, tokenizer=None, custom=None, start: float | None = None) -> CriteriaList:
    """transformers' order: max length, max time, stop strings, eos; then the user's criteria
    (a user criterion of the same class as a built-in one replaces it)."""
    built: list[StoppingCriterion] = [MaxLength(max_length)]
    if settings.max_time is not None:
        built.append(MaxTime(settings.max_time, start))
    if settings.stop_strings:
        built.append(StopStrings(tokenizer, settings.stop_strings))
    if settings.eos_token_ids:
        built.append(EosToken(settings.eos_token_ids))
    return CriteriaList(merge_user_list(built, custom))


def merge_user_list(built: list, custom) -> list:
    """transformers' merge: a user object of the same type as a built one takes its place; the
    other user objects follow in their order."""
    custom = list(custom or [])
    for item in custom:
        if not callable(item):
            raise TypeError(f"logits processors and stopping criteria must be callables (input_ids, scores), got "
                            f"{type(item).__name__}")
    out = []
    for item in built:
        same = next((c for c in custom if type(c) is type(item)), None)
        out.append(same if same is not None else item)
    out += [c for c in custom if not any(c is o for o in out)]
    return out
