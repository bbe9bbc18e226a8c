"""The decoding loop for greedy search and sampling, and what beam search shares with it.

Every step goes through the model's own ``forward`` (its ``__call__``), so the hooks of wrappers
users add (FSDP2's unsharding, for one) run as they do in training. With ``use_cache`` (the
default) the KV cache is preallocated once for prompt + new tokens; with ``use_cache=False``
every step recomputes the whole sequence (image features are still computed once).

    prepare (checks, left padding, positions, expansion) -> prefill -> per step:
    raw logits -> processors (scores) -> selector -> eos padding -> criteria -> decode one
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .. import ops
from ..components.sampler import SamplerState, build_chain, make_generators, with_user_processors
from .criteria import build_criteria
from .settings import GenerationSettings, resolve_settings


# ---- inputs ----------------------------------------------------------------------------------


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Move each row's padding to the left (a stable sort on the mask); left-padded input is unchanged."""
    if bool(attention_mask[:, -1].all()):  # already left padded (or not padded)
        return input_ids, attention_mask
    order = torch.sort(attention_mask.long(), dim=1, stable=True).indices  # pads first, order kept
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """cumsum(mask) - 1 with padding positions set to 0, as transformers' generate builds them."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def check_prompt(input_ids, attention_mask, vocab_size: int) -> None:
    """The prompt: [batch, length >= 1] integer ids inside the vocabulary, each row with a token."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate needs input_ids [batch, length], got {got}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"generate needs at least one prompt token per row, got input_ids {tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab_size})")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids "
                             f"{tuple(input_ids.shape)}")
        empty_rows = (attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
        if empty_rows:
            raise ValueError(f"attention_mask rows {empty_rows} mask out every prompt token")


def check_logits(logits: torch.Tensor, step: int) -> None:
    """NaN/inf logits mean broken weights or inputs: say so instead of returning token 0 for ever.

    Asked at every step, so first in one vectorized pass: the smallest and largest logit (aminmax
    propagates NaN) are finite exactly when every logit is. isfinite + all over a 49k vocabulary
    took ~110 µs a step on CPU (1-2% of a quantized decode step), aminmax ~10 µs.
    """
    if logits.numel() == 0 or not logits.is_floating_point():
        return
    bounds = torch.stack(torch.aminmax(logits)).tolist()  # one host sync for both
    if math.isfinite(bounds[0]) and math.isfinite(bounds[1]):
        return
    finite = torch.isfinite(logits).all(dim=-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"the model produced NaN/inf logits at generation step {step} for rows {rows} "
                                 "(check the weights, e.g. load without allow_nonfinite, and the inputs)")


def fit_context(prompt_length: int, max_new_tokens: int, context: int, strict: bool) -> None:
    """transformers generates past max_position_embeddings with a warning (RoPE positions run past
    the trained length); so do we. ``strict_context=True`` refuses instead."""
    if prompt_length + max_new_tokens <= context:
        return
    message = (f"the prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
               f"context of {context} tokens (max_position_embeddings)")
    if strict:
        raise ValueError(f"{message}; shorten the prompt or use fewer/smaller images (strict_context=True)")
    warnings.warn(f"{message}: positions past it were never trained, quality may drop", stacklevel=4)


@dataclass
class Prompt:
    """The prepared prompt: left padded, expanded (each row repeated ``expand`` times in place)."""

    input_ids: torch.Tensor  # [R, L]
    mask: torch.Tensor  # [R, L] int64
    positions: torch.Tensor  # [R, L]
    pixel_values: torch.Tensor | None
    pixel_attention_mask: torch.Tensor | None
    all_ones: bool  # no padding anywhere: the model gets no mask at all (as transformers does)

    @property
    def pad_lengths(self) -> torch.Tensor | None:
        """[R] left-padding tokens per row (None without padding): transformers' repetition penalty skips them."""
        return None if self.all_ones else (self.mask != 0).int().argmax(dim=1)


def prepare_prompt(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, expand: int = 1) -> Prompt:
    check_prompt(input_ids, attention_mask, model.decoder.config.vocab_size)
    device = model.device
    input_ids = input_ids.to(device)
    if input_ids.dtype != torch.long:
        input_ids = input_ids.long()
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    input_ids, mask = to_left_padding(input_ids, mask)
    pixel_values = None if pixel_values is None else pixel_values.to(device)
    pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask.to(device)
    if expand > 1:  # [B, ...] -> [B * expand, ...], each row's copies together (transformers' order)
        input_ids, mask = input_ids.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0)
        if pixel_values is not None:
            pixel_values = pixel_values.repeat_interleave(expand, 0)
        if pixel_attention_mask is not None:
            pixel_attention_mask = pixel_attention_mask.repeat_interleave(expand, 0)
    return Prompt(input_ids, mask, position_ids_from_mask(mask), pixel_values, pixel_attention_mask,
                  bool(mask.all()))


# ---- model calls -----------------------------------------------------------------------------


class Stepper:
    """Runs the model for the prompt and for each new token, cached or recomputing."""

    def __init__(self, model, prompt: Prompt, total_length: int, use_cache: bool):
        self.model, self.prompt, self.use_cache = model, prompt, use_cache
        rows, length = prompt.input_ids.shape
        self.length = length
        self.mask = torch.ones((rows, total_length), dtype=torch.long, device=prompt.input_ids.device)
        self.mask[:, :length] = prompt.mask
        self.next_position = prompt.positions[:, -1] + 1  # [R]
        self.cache = model.decoder.new_cache(rows, total_length) if use_cache else None
        self.features = None
        if use_cache:
            ops.prepare_decode(model.decoder, rows)  # bf16 on CPU: packed weights where they pay (ops/matmul.py)

    def _mask(self, length: int):
        return None if self.prompt.all_ones else self.mask[:, :length]

    def prefill(self) -> torch.Tensor:
        """Logits [R, V] after the prompt (images merged in, their features computed once)."""
        p = self.prompt
        if self.use_cache:
            out = self.model(input_ids=p.input_ids, attention_mask=self._mask(self.length), position_ids=p.positions,
                             pixel_values=p.pixel_values, pixel_attention_mask=p.pixel_attention_mask,
                             cache=self.cache, logits_to_keep=1)
            return out.logits[:, -1]
        if p.pixel_values is not None:
            self.features = self.model.get_image_features(p.pixel_values, p.pixel_attention_mask)
        return self.recompute(p.input_ids)

    def recompute(self, tokens: torch.Tensor) -> torch.Tensor:
        """use_cache=False: the whole sequence [R, T] again -> last logits [R, V]."""
        length = tokens.shape[1]
        mask = self.mask[:, :length]
        out = self.model(input_ids=tokens, attention_mask=self._mask(length), position_ids=position_ids_from_mask(mask),
                         image_hidden_states=self.features, logits_to_keep=1)
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, new_count: int) -> torch.Tensor:
        """Logits [R, V] after the ``new_count``-th new token; ``tokens`` [R, L + new_count] so far."""
        if not self.use_cache:
            return self.recompute(tokens)
        last = tokens[:, -1]
        positions = self.next_position + (new_count - 1)
        out = self.model(input_ids=last[:, None], position_ids=positions[:, None],
                         attention_mask=self._mask(self.length + new_count), cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        """Follow the beams: row r continues the sequence of row ``rows[r]``."""
        if self.cache is not None:
            self.cache.reorder(rows)


# ---- greedy search and sampling --------------------------------------------------------------


def sampler_chain(s: GenerationSettings, prompt_length: int, sampler=None, logits_processor=None):
    """The settings' chain of processors and selector, with the user's processors in place."""
    if sampler is not None:
        if logits_processor:
            raise ValueError("pass sampler= or logits_processor=, not both")
        return sampler
    chain = build_chain(s.do_sample, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
                        s.min_tokens(prompt_length))
    return with_user_processors(chain, logits_processor)


def process_and_select(chain, logits: torch.Tensor, state: SamplerState):
    """(scores [R, V], next ids [R]); a plain callable sampler gives its ids and the raw scores."""
    if hasattr(chain, "process") and hasattr(chain, "selector"):
        scores = chain.process(logits, state)
        return scores, chain.selector(scores, state)
    return logits, chain(logits, state)


class Record:
    """Per-step raw logits and processed scores, when ``return_dict_in_generate`` asks for them."""

    def __init__(self, scores: bool, logits: bool):
        self.scores: list[torch.Tensor] | None = [] if scores else None
        self.logits: list[torch.Tensor] | None = [] if logits else None

    def add(self, raw: torch.Tensor, scores: torch.Tensor) -> None:
        if self.logits is not None:
            self.logits.append(raw.clone())
        if self.scores is not None:
            self.scores.append(scores.clone())

    def scores_so_far(self):
        return tuple(self.scores) if self.scores is not None else None


def generate_steps(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                   seed=None, generator=None, sampler=None, logits_processor=None, stopping_criteria=None,
                   tokenizer=None, record: Record | None = None, settings: GenerationSettings | None = None,
                   **kwargs):
    """The greedy/sampling loop as an iterator.

    Yields ``(prompt, mask)`` once (the left-padded, expanded prompt [R, L] and its mask), then the
    new tokens [R] of each step (finished rows get the pad id when there are eos ids, as in
    transformers) until every row has stopped or the new-token budget is spent.
    """
    s = settings or resolve_settings(model.generation_config, model.decoder.config, **kwargs)
    expand = s.num_return_sequences if s.do_sample else 1
    prompt = prepare_prompt(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, expand)
    rows, length = prompt.input_ids.shape
    max_new = s.new_tokens(length)
    fit_context(length, max_new, model.decoder.config.max_position_embeddings, s.strict_context)
    yield prompt.input_ids, prompt.mask
    if max_new == 0:
        return
    device = prompt.input_ids.device
    chain = sampler_chain(s, length, sampler, logits_processor)
    criteria = build_criteria(s, length + max_new, tokenizer, stopping_criteria)
    pad = s.pad_token_id if s.pad_token_id is not None else 0
    tokens = torch.full((rows, length + max_new), pad, dtype=torch.long, device=device)  # prompt + new
    tokens[:, :length] = prompt.input_ids
    state = SamplerState(tokens=tokens[:, :length], new_tokens=0,
                         eos_token_ids=torch.tensor(s.eos_token_ids, dtype=torch.long, device=device),
                         generators=make_generators(seed, generator, rows, device), pad_lengths=prompt.pad_lengths)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    stepper = Stepper(model, prompt, length + max_new, s.use_cache)
    logits = stepper.prefill()
    for step in range(max_new):
        check_logits(logits, step)
        raw = logits.float()
        scores, nxt = process_and_select(chain, raw, state)
        if record is not None:
            record.add(raw, scores)
        if criteria.has_eos:
            nxt = torch.where(unfinished, nxt, pad)
        tokens[:, length + step] = nxt
        so_far = tokens[:, :length + step + 1]
        state.tokens, state.new_tokens = so_far, step + 1
        yield nxt
        unfinished &= ~criteria(so_far, record.scores_so_far() if record is not None else None)
        if not bool(unfinished.any()):
            return
        logits = stepper.step(so_far, step + 1)
