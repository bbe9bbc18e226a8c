"""Beam search, step for step the algorithm of transformers' ``_beam_search`` (5.x), so the ids,
scores and beam indices are the same.

Per step, for B prompts of K beams each (rows b*K + k):

    log_softmax(raw logits) -> processors -> + running beam scores -> top (max(2, 1 + #eos) * K)
    candidates over K * V -> criteria on each candidate -> the K best unfinished ones run on
    (the KV cache follows them) -> finished candidates among the top K, length-penalized
    (score / new_length ** length_penalty), merge into the K best finished hypotheses.

It stops when no running beam can still beat a finished one (the early-stopping heuristic), when
every beam has finished with ``early_stopping=True``, or when every candidate hits a criterion
(the length limit, at the latest).
"""

from __future__ import annotations

import torch

from ..components.sampler import SamplerState
from .criteria import build_criteria
from .loop import Record, Stepper, check_logits, fit_context, prepare_prompt, sampler_chain
from .output import GenerateOutput
from .settings import GenerationSettings

NEG = -1.0e9  # transformers' "never" score


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t [B, K, ...] rows picked per batch item by index [B, J] -> [B, J, ...]."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def _fill_value(s: GenerationSettings) -> int:
    """transformers' filler after a finished beam: ``pad_token_id or eos_token_id[0]`` (so a pad id
    of 0 gives way to the eos id), or -1 without eos ids."""
    if not s.eos_token_ids:
        return -1
    return s.pad_token_id if s.pad_token_id else s.eos_token_ids[0]


class BeamState:
    """The running beams and the finished hypotheses of every prompt."""

    def __init__(self, prompt_ids: torch.Tensor, batch: int, beams: int, max_length: int, fill: int):
        device = prompt_ids.device
        length = prompt_ids.shape[1]
        self.running = torch.full((batch, beams, max_length), fill, dtype=torch.long, device=device)
        self.running[:, :, :length] = prompt_ids.view(batch, beams, length)
        self.sequences = self.running.clone()  # finished hypotheses
        self.running_scores = torch.zeros((batch, beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = NEG  # the K copies of a prompt: only the first one starts
        self.scores = torch.full((batch, beams), NEG, dtype=torch.float, device=device)
        self.finished = torch.zeros((batch, beams), dtype=torch.bool, device=device)
        self.can_improve = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.running_indices = torch.full((batch, beams, max_length - length), -1, dtype=torch.int32, device=device)
        self.indices = self.running_indices.clone()
        self.hits = torch.zeros((batch, beams), dtype=torch.bool, device=device)


def beam_search(model, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, *,
                settings: GenerationSettings, logits_processor=None, stopping_criteria=None, tokenizer=None,
                generator=None, seed=None, record: Record | None = None) -> GenerateOutput:
    s = settings
    beams = s.num_beams
    prompt = prepare_prompt(model, input_ids, attention_mask, pixel_values, pixel_attention_mask, expand=beams)
    rows, length = prompt.input_ids.shape
    batch = rows // beams
    max_new = s.new_tokens(length)
    fit_context(length, max_new, model.decoder.config.max_position_embeddings, s.strict_context)
    max_length = length + max_new
    if max_new == 0:
        return GenerateOutput(sequences=prompt.input_ids[::beams].repeat_interleave(s.num_return_sequences, 0))
    device = prompt.input_ids.device
    chain = sampler_chain(s, length, None, logits_processor)
    criteria = build_criteria(s, max_length, tokenizer, stopping_criteria)
    rng = _beam_generator(seed, generator, device)
    keep = max(2, 1 + len(s.eos_token_ids)) * beams
    top_beams = torch.zeros(keep, dtype=torch.bool, device=device)
    top_beams[:beams] = True
    b = BeamState(prompt.input_ids, batch, beams, max_length, _fill_value(s))
    state = SamplerState(eos_token_ids=torch.tensor(s.eos_token_ids, dtype=torch.long, device=device),
                         pad_lengths=prompt.pad_lengths)
    stepper = Stepper(model, prompt, max_length, s.use_cache)
    logits = stepper.prefill()
    cur = length
    while True:
        check_logits(logits, cur - length)
        raw = logits.float()
        state.tokens, state.new_tokens = b.running[:, :, :cur].reshape(rows, cur), cur - length
        log_probs = chain.process(torch.log_softmax(raw, dim=-1), state)
        if record is not None:
            record.add(raw, log_probs)
        cand_scores, cand_seqs, cand_indices = _top_candidates(b, log_probs, cur, length, keep, s.do_sample, rng)
        hits = criteria(cand_seqs[:, :, :cur + 1].reshape(batch * keep, cur + 1),
                        record.scores_so_far() if record is not None else None).view(batch, keep)
        _advance_running(b, cand_scores, cand_seqs, cand_indices, hits, beams)
        _update_finished(b, cand_scores, cand_seqs, cand_indices, hits & top_beams[None, :], beams,
                         cur + 1 - length, s)
        stepper.reorder(b.running_indices[..., cur - length].reshape(rows).long())
        cur += 1
        _update_heuristic(b, cur, length, max_length, s)
        if not _continues(b, hits, s.early_stopping):
            break
        logits = stepper.step(b.running[:, :, :cur].reshape(rows, cur), cur - length)
    return _finish(b, s, length, record)


def _beam_generator(seed, generator, device):
    if isinstance(generator, (list, tuple)) or isinstance(seed, (list, tuple)):
        raise ValueError("beam sampling takes one seed or generator for the whole batch, not one per row")
    if generator is not None:
        return generator
    if seed is None:
        return None
    rng = torch.Generator(device=device)
    rng.manual_seed(int(seed))
    return rng


def _top_candidates(b: BeamState, log_probs: torch.Tensor, cur: int, length: int, keep: int, do_sample: bool, rng):
    """The ``keep`` best continuations of each prompt over all its beams: (scores [B, keep],
    sequences [B, keep, max_length] with the new token at ``cur``, beam indices)."""
    batch, beams = b.running_scores.shape
    total = (log_probs.view(batch, beams, -1) + b.running_scores[:, :, None]).reshape(batch, -1)  # [B, K*V]
    if do_sample:
        picked = torch.multinomial(torch.softmax(total, dim=-1), num_samples=keep, generator=rng)
        scores = torch.gather(total, 1, picked)
        scores, order = scores.sort(dim=-1, descending=True)
        picked = picked.gather(-1, order)
    else:
        scores, picked = torch.topk(total, k=keep)
    vocab = total.shape[-1] // beams
    source_beam = picked // vocab
    indices = _gather(b.running_indices, source_beam)
    seqs = _gather(b.running, source_beam)
    seqs[:, :, cur] = picked % vocab
    offset = torch.arange(batch, device=picked.device).view(-1, 1) * beams
    indices[:, :, cur - length] = (source_beam + offset).to(indices.dtype)
    return scores, seqs, indices


def _advance_running(b: BeamState, cand_scores, cand_seqs, cand_indices, hits, beams: int) -> None:
    """The K best candidates that did not stop become the running beams."""
    running_scores = cand_scores + hits.to(torch.float32) * NEG
    best = torch.topk(running_scores, k=beams)[1]
    b.running = _gather(cand_seqs, best)
    b.running_scores = _gather(running_scores, best)
    b.running_indices = _gather(cand_indices, best)
    b.hits = hits


def _update_finished(b: BeamState, cand_scores, cand_seqs, cand_indices, just_finished, beams: int,
                     new_length: int, s: GenerationSettings) -> None:
    """Merge the candidates that just finished (top K only) into the K best finished hypotheses."""
    scores = cand_scores / (new_length ** s.length_penalty)
    full = torch.all(b.finished, dim=-1, keepdim=True) & (s.early_stopping is True)
    scores = scores + full.to(torch.float32) * NEG
    scores = scores + (~b.can_improve).to(torch.float32) * NEG
    scores = scores + (~just_finished) * NEG
    merged_scores = torch.cat((b.scores, scores), dim=1)
    best = torch.topk(merged_scores, k=beams)[1]
    b.sequences = _gather(torch.cat((b.sequences, cand_seqs), dim=1), best)
    b.scores = _gather(merged_scores, best)
    b.indices = _gather(torch.cat((b.indices, cand_indices), dim=1), best)
    b.finished = _gather(torch.cat((b.finished, just_finished), dim=1), best)


def _update_heuristic(b: BeamState, cur: int, length: int, max_length: int, s: GenerationSettings) -> None:
    """Can the best running beam still beat the worst finished one? (transformers' heuristic:
    with early_stopping='never' and a positive length penalty it assumes the longest length.)"""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_length = max_length - length
    else:
        best_length = cur - length
    best_running = b.running_scores[:, :1] / (best_length ** s.length_penalty)
    worst_finished = torch.where(b.finished, torch.min(b.scores, dim=1, keepdim=True)[0], NEG)
    b.can_improve = b.can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)


def _continues(b: BeamState, hits, early_stopping) -> bool:
    improvement_possible = torch.any(b.can_improve)
    open_beam = ~(torch.all(b.finished) & (early_stopping is True))
    continuations = ~torch.all(hits)
    return bool(improvement_possible & open_beam & continuations)


def _finish(b: BeamState, s: GenerationSettings, length: int, record: Record | None) -> GenerateOutput:
    n = s.num_return_sequences
    batch, beams, max_length = b.sequences.shape
    sequences = b.sequences[:, :n].reshape(batch * n, max_length)
    scores = b.scores[:, :n].reshape(batch * n)
    indices = b.indices[:, :n].reshape(batch * n, -1)
    generated = int((indices + 1).bool().sum(dim=1).max())
    return GenerateOutput(sequences=sequences[:, :length + generated],
                          scores=tuple(record.scores) if record is not None and record.scores is not None else None,
                          logits=tuple(record.logits) if record is not None and record.logits is not None else None,
                          sequences_scores=scores if s.output_scores else None,
                          beam_indices=indices[:, :generated])
