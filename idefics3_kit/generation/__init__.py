"""Generation over a VLM: greedy search, sampling and beam search, with transformers' arguments.

    generate(model, input_ids, ..., **kwargs)      -> ids [R, L + n], or a GenerateOutput
    generate_steps(model, input_ids, ...)          -> the greedy/sampling loop as an iterator

Rooms: ``settings`` (arguments resolved and checked), ``loop`` (inputs, model calls, the
greedy/sampling loop), ``beam`` (beam search), ``criteria`` (stopping), ``output``
(``return_dict_in_generate``). docs/generation.md explains the loop; docs/transformers.md lists
every transformers argument and what we do with it.
"""

from __future__ import annotations

import torch

from .beam import beam_search
from .criteria import CriteriaList, EosToken, MaxLength, MaxTime, StopStrings
from .loop import (Record, check_logits, check_prompt, generate_steps, position_ids_from_mask,
                   to_left_padding)
from .output import GenerateOutput
from .settings import GenerationSettings, as_dict, resolve_settings


def generate(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
             streamer=None, logits_processor=None, stopping_criteria=None, tokenizer=None, seed=None,
             generator=None, sampler=None, generation_config=None, **kwargs):
    """Prompt + new tokens [R, L + n] (left padded), like transformers' generate; a GenerateOutput
    with ``return_dict_in_generate=True``. R = batch x num_return_sequences."""
    s = resolve_settings(model.generation_config, model.decoder.config, generation_config, **kwargs)
    record = Record(s.output_scores, s.output_logits) if s.return_dict_in_generate else None
    with torch.inference_mode():
        if s.num_beams > 1:
            if streamer is not None:
                raise ValueError("streamer cannot be used with beam search (as in transformers): use num_beams=1")
            if sampler is not None:
                raise ValueError("sampler= replaces greedy/multinomial selection; beam search has its own")
            out = beam_search(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, settings=s,
                              logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                              tokenizer=tokenizer, generator=generator, seed=seed, record=record)
            return out if s.return_dict_in_generate else out.sequences
        steps = generate_steps(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, seed=seed,
                               generator=generator, sampler=sampler, logits_processor=logits_processor,
                               stopping_criteria=stopping_criteria, tokenizer=tokenizer, record=record, settings=s)
        prompt, _ = next(steps)
        if streamer is not None:
            streamer.put(prompt.cpu())  # transformers sends the prompt first (skip_prompt drops it)
        new = []
        for nxt in steps:
            new.append(nxt)
            if streamer is not None:
                streamer.put(nxt.cpu())
        if streamer is not None:
            streamer.end()
    sequences = torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt
    if not s.return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences=sequences, scores=record.scores_so_far(),
                          logits=tuple(record.logits) if record.logits is not None else None)


__all__ = ["generate", "generate_steps", "beam_search", "resolve_settings", "GenerationSettings", "GenerateOutput",
           "as_dict", "to_left_padding", "position_ids_from_mask", "check_prompt", "check_logits", "CriteriaList",
           "EosToken", "MaxLength", "MaxTime", "StopStrings", "Record"]
