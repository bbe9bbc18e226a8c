"""Generation: the decoding loop over a VLM (greedy, sampling), streaming hooks.

The model's KV cache (``decoder.new_cache``) is preallocated once per generation for the whole
sequence (prompt + new tokens). Every step goes through the model's own ``forward`` (its
``__call__``), so the hooks of wrappers users add (FSDP2's unsharding, for one) run as they do
in training.

The loop is a handful of small functions (gpt-fast style), see docs/generation.md:

    resolve_settings -> to_left_padding -> position_ids_from_mask -> check_context
    -> prefill (image features once, last-position logits) -> [sampler chain -> decode_one] x n

``generate_steps`` is the loop as an iterator (used by ``generate`` and streaming).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import ops
from .components.sampler import SamplerState, build_chain, make_generators


# ---- generation ------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    """Resolved generation arguments (call > generation_config.json > model config > defaults)."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None


def _as_id_list(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten())
    return tuple(int(v) for v in value)


def resolve_settings(generation_config: dict, decoder_config, **kwargs) -> GenerationSettings:
    """Merge the call's arguments over ``generation_config`` (a dict from generation_config.json)."""
    known = set(GenerationSettings.__dataclass_fields__) | {"eos_token_id", "max_length"}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"generate got unexpected arguments: {', '.join(sorted(unknown))}")
    gc = dict(generation_config or {})
    merged = {k: v for k, v in gc.items() if k in known and v is not None}
    merged.update({k: v for k, v in kwargs.items() if v is not None})
    eos = merged.pop("eos_token_id", None)
    if eos is None:
        eos = getattr(decoder_config, "eos_token_id", None)
    if "eos_token_ids" not in merged:
        merged["eos_token_ids"] = _as_id_list(eos)
    merged.pop("max_length", None)  # prompt + new: superseded by max_new_tokens (transformers' default 20)
    if merged.get("pad_token_id") is None:
        pad = getattr(decoder_config, "pad_token_id", None)
        if pad is None and merged["eos_token_ids"]:
            pad = merged["eos_token_ids"][0]  # transformers' fallback
        merged["pad_token_id"] = pad
    s = GenerationSettings(**merged)
    if not isinstance(s.max_new_tokens, int) or s.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {s.max_new_tokens!r}")
    if not isinstance(s.min_new_tokens, int) or s.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {s.min_new_tokens!r}")
    if s.do_sample and s.temperature is not None and not s.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {s.temperature}")
    if s.top_p is not None and not 0.0 <= s.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {s.top_p}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {s.min_p}")
    if s.top_k is not None and (not isinstance(s.top_k, int) or s.top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {s.top_k!r}")
    if s.repetition_penalty is not None and not s.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    _check_token_ids(s, getattr(decoder_config, "vocab_size", None))
    return s


def _check_token_ids(s: GenerationSettings, vocab_size: int | None) -> None:
    """pad and eos ids must be rows of the LM head; otherwise the loop fails mid-way with IndexError."""
    if vocab_size is None:
        return
    for name, ids in (("eos_token_id", s.eos_token_ids), ("pad_token_id", (s.pad_token_id,))):
        for token_id in ids:
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size})")


def check_prompt(input_ids, attention_mask, vocab_size: int) -> None:
    """The prompt: [batch, length >= 1] integer ids inside the vocabulary, each row with a token."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"generate needs input_ids [batch, length], got {got}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
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
    """NaN/inf logits mean broken weights or inputs: say so instead of returning token 0 for ever."""
    finite = torch.isfinite(logits).all(dim=-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        raise FloatingPointError(f"the model produced NaN/inf logits at generation step {step} for rows {rows} "
                                 "(check the weights, e.g. load without allow_nonfinite, and the inputs)")


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


def prefill(model, cache, input_ids, attention_mask, position_ids, pixel_values=None,
            pixel_attention_mask=None, mask_all_ones: bool = False) -> torch.Tensor:
    """Run the prompt (images merged in, features computed once) -> last-position logits [B, V]."""
    out = model(input_ids=input_ids, attention_mask=None if mask_all_ones else attention_mask,
                position_ids=position_ids, pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                cache=cache, logits_to_keep=1)
    return out.logits[:, -1]


def decode_one(model, cache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask) -> torch.Tensor:
    """One cached step: tokens [B] at positions [B] -> logits [B, V]."""
    out = model(input_ids=tokens[:, None], position_ids=positions[:, None], attention_mask=attention_mask,
                cache=cache, logits_to_keep=1)
    return out.logits[:, -1]


def check_context(prompt_length: int, max_new_tokens: int, context: int) -> int:
    """Clear error for a prompt that does not fit; new tokens capped at the context."""
    if prompt_length >= context:
        raise ValueError(f"the prompt has {prompt_length} tokens but the model's context is {context} tokens "
                         "(max_position_embeddings); shorten the prompt or use fewer/smaller images")
    if prompt_length + max_new_tokens > context:
        allowed = context - prompt_length
        warnings.warn(f"max_new_tokens={max_new_tokens} exceeds the context ({prompt_length} prompt tokens "
                      f"+ {max_new_tokens} > {context}); generating at most {allowed}", stacklevel=3)
        return allowed
    return max_new_tokens


def generate_steps(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                   seed=None, generator=None, sampler=None, **kwargs):
    """The decoding loop as an iterator.

    Yields ``(prompt, mask)`` once (the left-padded prompt [B, L] and its mask), then the new
    tokens [B] of each step (finished rows get the pad id) until every row has finished or
    ``max_new_tokens`` are generated. ``sampler`` replaces the chain built from the arguments.
    """
    s = resolve_settings(model.generation_config, model.decoder.config, **kwargs)
    check_prompt(input_ids, attention_mask, model.decoder.config.vocab_size)
    device = model.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = to_left_padding(input_ids, attention_mask.to(device).long())
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    if pixel_attention_mask is not None:
        pixel_attention_mask = pixel_attention_mask.to(device)
    b, length = input_ids.shape
    max_new = check_context(length, s.max_new_tokens, model.decoder.config.max_position_embeddings)
    yield input_ids, attention_mask
    if max_new == 0:
        return
    total = length + max_new
    chain = sampler if sampler is not None else build_chain(
        s.do_sample, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty, s.min_new_tokens)
    pad = s.pad_token_id if s.pad_token_id is not None else 0
    tokens = torch.full((b, total), pad, dtype=torch.long, device=device)  # prompt + new, preallocated
    tokens[:, :length] = input_ids
    mask = torch.ones((b, total), dtype=torch.long, device=device)
    mask[:, :length] = attention_mask
    all_ones = bool(attention_mask.all())
    eos = torch.tensor(s.eos_token_ids, dtype=torch.long, device=device)
    state = SamplerState(tokens=tokens[:, :length], new_tokens=0, eos_token_ids=eos,
                         generators=make_generators(seed, generator, b, device))
    positions = position_ids_from_mask(attention_mask)
    next_pos = positions[:, -1] + 1
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    cache = model.decoder.new_cache(b, total)
    ops.prepare_decode(model.decoder, b)  # bf16 on CPU: packed weights where they pay (ops/matmul.py)
    logits = prefill(model, cache, input_ids, attention_mask, positions, pixel_values, pixel_attention_mask,
                     mask_all_ones=all_ones)
    for step in range(max_new):
        check_logits(logits, step)
        nxt = chain(logits.float(), state)
        if eos.numel():
            nxt = torch.where(unfinished, nxt, pad)
            unfinished &= ~torch.isin(nxt, eos)
        tokens[:, length + step] = nxt
        state.tokens = tokens[:, :length + step + 1]
        state.new_tokens = step + 1
        yield nxt
        if step + 1 == max_new or not bool(unfinished.any()):
            return
        logits = decode_one(model, cache, nxt, next_pos + step,
                            None if all_ones else mask[:, :length + step + 1])


def generate(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
             streamer=None, **kwargs) -> torch.Tensor:
    """Prompt + new tokens [B, L + n] (left padded), like transformers' generate."""
    with torch.inference_mode():
        steps = generate_steps(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, **kwargs)
        prompt, _ = next(steps)
        new = []
        for nxt in steps:
            new.append(nxt)
            if streamer is not None:
                streamer.put(nxt)
        if streamer is not None:
            streamer.end()
    return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
