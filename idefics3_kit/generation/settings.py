"""Generation arguments: call > ``generation_config=`` (a GenerationConfig-like object or dict) >
the checkpoint's generation_config.json > the model config > defaults, resolved and checked once.

The names and meanings are transformers' ``GenerationConfig``'s. Arguments of transformers that
change the result and are not implemented here are refused by name (an error, never silently
ignored); the ones that cannot change the result (metadata, output switches we do not produce
when off) pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


@dataclass
class GenerationSettings:
    """Resolved generation arguments (see ``resolve_settings``)."""

    max_new_tokens: int | None = None
    max_length: int | None = None  # prompt + new, used when max_new_tokens is not given
    min_new_tokens: int = 0
    min_length: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple = ()
    pad_token_id: int | None = None
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    stop_strings: tuple = ()
    use_cache: bool = True
    strict_context: bool = False  # refuse a prompt + new tokens longer than max_position_embeddings
    max_time: float | None = None  # seconds; every row stops after the step that passes it

    def new_tokens(self, prompt_length: int) -> int:
        """How many tokens to generate after a prompt of ``prompt_length`` (transformers' rule:
        max_new_tokens wins, else max_length counts the prompt, else 20 new tokens)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_length, 0)
        return 20

    def min_tokens(self, prompt_length: int) -> int:
        if self.min_new_tokens:
            return self.min_new_tokens
        if self.min_length:
            return max(self.min_length - prompt_length, 0)
        return 0


# Keys of transformers' GenerationConfig that cannot change the tokens (metadata, defaults of
# features we do not have at their neutral value are checked separately below).
_IGNORED = {"transformers_version", "_from_model_config", "bos_token_id", "decoder_start_token_id",
            "cache_implementation", "cache_config", "return_legacy_cache", "compile_config", "disable_compile",
            "is_assistant", "_commit_hash", "generation_kwargs", "low_memory", "synced_gpus", "trust_remote_code",
            "prefill_chunk_size", "base_model_prefix"}

# transformers' arguments that change the result and are not implemented: refused unless neutral.
_UNSUPPORTED_NEUTRAL = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
                        "num_beam_groups": 1, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                        "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None,
                        "renormalize_logits": False, "constraints": None, "forced_bos_token_id": None,
                        "forced_eos_token_id": None, "remove_invalid_values": False,
                        "exponential_decay_length_penalty": None, "suppress_tokens": None,
                        "begin_suppress_tokens": None, "sequence_bias": None, "token_healing": False,
                        "guidance_scale": None, "watermarking_config": None, "penalty_alpha": None,
                        "dola_layers": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
                        "max_matching_ngram_size": None, "assistant_early_exit": None, "top_h": None,
                        "num_assistant_tokens": None, "num_assistant_tokens_schedule": None,
                        "assistant_confidence_threshold": None, "output_attentions": False,
                        "output_hidden_states": False, "custom_generate": None, "prefix_allowed_tokens_fn": None,
                        "negative_prompt_ids": None, "negative_prompt_attention_mask": None,
                        "use_model_defaults": None}
_UNSUPPORTED_NEUTRAL_EXTRA = {"typical_p": (None,), "epsilon_cutoff": (None,), "eta_cutoff": (None,),
                              "diversity_penalty": (None,), "num_beam_groups": (None,),
                              "encoder_repetition_penalty": (None,), "no_repeat_ngram_size": (None,),
                              "encoder_no_repeat_ngram_size": (None,), "renormalize_logits": (None,),
                              "remove_invalid_values": (None,), "token_healing": (None,),
                              "output_attentions": (None,), "output_hidden_states": (None,), "guidance_scale": (1.0,)}

_FIELDS = {f.name for f in dataclasses.fields(GenerationSettings)}
_ALIASES = {"eos_token_id"}


def as_dict(config) -> dict:
    """A GenerationConfig (transformers'), any object with ``to_dict()``, or a mapping -> dict."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    for method in ("to_diff_dict", "to_dict"):
        if callable(getattr(config, method, None)):
            return dict(getattr(config, method)())
    raise TypeError(f"generation_config must be a GenerationConfig-like object or a dict, got "
                    f"{type(config).__name__}")


def _as_id_list(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten())
    return tuple(int(v) for v in value)


def _refuse_unsupported(values: Mapping[str, Any], where: str) -> None:
    bad = []
    for key, value in values.items():
        if key in _UNSUPPORTED_NEUTRAL:
            neutral = (_UNSUPPORTED_NEUTRAL[key],) + _UNSUPPORTED_NEUTRAL_EXTRA.get(key, ())
            if value not in neutral:
                bad.append(f"{key}={value!r}")
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} not supported by idefics3_kit's generate (docs/transformers.md "
                         "lists what is); leave it at its default or use transformers for it")


def resolve_settings(defaults: Mapping[str, Any] | None, decoder_config, generation_config=None,
                     **kwargs) -> GenerationSettings:
    """Merge the call's keyword arguments over ``generation_config`` (the call's, else ``defaults``:
    the checkpoint's generation_config.json) and the model config's token ids, then check them."""
    known = _FIELDS | _ALIASES
    unknown = set(kwargs) - known - set(_UNSUPPORTED_NEUTRAL) - _IGNORED
    if unknown:
        raise TypeError(f"generate got unexpected arguments: {', '.join(sorted(unknown))}")
    base = as_dict(generation_config) if generation_config is not None else dict(defaults or {})
    _refuse_unsupported(base, "generation_config")
    _refuse_unsupported(kwargs, "generate")
    merged = {k: v for k, v in base.items() if k in known and v is not None}
    merged.update({k: v for k, v in kwargs.items() if k in known and v is not None})
    eos = merged.pop("eos_token_id", None)
    if eos is None:
        eos = getattr(decoder_config, "eos_token_id", None)
    if "eos_token_ids" not in merged:
        merged["eos_token_ids"] = _as_id_list(eos)
    if merged.get("pad_token_id") is None:
        pad = getattr(decoder_config, "pad_token_id", None)
        if pad is None and merged["eos_token_ids"]:
            pad = merged["eos_token_ids"][0]  # transformers' fallback
        merged["pad_token_id"] = pad
    if isinstance(merged.get("stop_strings"), str):
        merged["stop_strings"] = (merged["stop_strings"],)
    if merged.get("stop_strings") is not None:
        merged["stop_strings"] = tuple(merged["stop_strings"])
    s = GenerationSettings(**merged)
    check_settings(s, getattr(decoder_config, "vocab_size", None))
    return s


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(s: GenerationSettings, vocab_size: int | None) -> None:
    """Each value in its range, with the argument named (transformers' GenerationConfig.validate)."""
    for name in ("max_new_tokens", "max_length", "min_length"):
        value = getattr(s, name)
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not _is_int(s.min_new_tokens) or s.min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {s.min_new_tokens!r}")
    if s.do_sample and s.temperature is not None and not s.temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {s.temperature}")
    if s.top_p is not None and not 0.0 <= s.top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {s.top_p}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {s.min_p}")
    if s.top_k is not None and (not _is_int(s.top_k) or s.top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0, got {s.top_k!r}")
    if s.repetition_penalty is not None and not s.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    if not _is_int(s.num_beams) or s.num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {s.num_beams!r}")
    if not _is_int(s.num_return_sequences) or s.num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {s.num_return_sequences!r}")
    if s.num_beams > 1 and s.num_return_sequences > s.num_beams:
        raise ValueError(f"num_return_sequences ({s.num_return_sequences}) must be <= num_beams ({s.num_beams})")
    if s.num_beams == 1 and not s.do_sample and s.num_return_sequences > 1:
        raise ValueError(f"greedy search returns one sequence per prompt: num_return_sequences="
                         f"{s.num_return_sequences} needs do_sample=True or num_beams >= {s.num_return_sequences}")
    if isinstance(s.length_penalty, bool) or not isinstance(s.length_penalty, (int, float)) \
            or not math.isfinite(s.length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {s.length_penalty!r}")
    if s.early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {s.early_stopping!r}")
    for name in ("do_sample", "return_dict_in_generate", "output_scores", "output_logits", "use_cache",
                 "strict_context"):
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(s, name)!r}")
    if s.max_time is not None and (isinstance(s.max_time, bool) or not isinstance(s.max_time, (int, float))
                                   or not s.max_time > 0):
        raise ValueError(f"max_time must be a number of seconds > 0, got {s.max_time!r}")
    if not all(isinstance(t, str) and t for t in s.stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(s.stop_strings)!r}")
    if vocab_size is not None:
        for name, ids in (("eos_token_id", s.eos_token_ids), ("pad_token_id", (s.pad_token_id,))):
            for token_id in ids:
                if token_id is not None and not 0 <= token_id < vocab_size:
                    raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size})")
