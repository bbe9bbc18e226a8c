"""Continuous batching: the rows decoding together, and how rows join and leave between steps.

A ``RunningBatch`` holds the rows being decoded, one KV cache for all of them, and per row its
attention mask, token history, next position and pending token. Requests that arrive while it
decodes are prefilled on their own (one forward over their left-padded prompts, images included)
and joined at the next step; rows that finish leave at once. Both repack the cache: every row's
cached tokens are the last ``real`` columns of its cache row (left padding before them), so a
repack copies each row's last ``real`` columns to the right end of a new cache whose length is
the longest row's, which also drops padding nobody needs any more. Positions are per row (the
model's rotary positions never see the padding), so a row decodes exactly as it would alone, up
to the float rounding of a different batch shape.

Layout, for B rows and a cache of ``length`` written columns out of ``max_length``:

    cache keys/values [B, Hkv, max_length, hd]   row i's tokens at [length - real[i], length)
    mask   [B, max_length]   1 on those columns, 0 elsewhere (the column at ``length`` is set per step)
    tokens [B, max_length]   the ids at those columns (pad id elsewhere): the sampler's history
    positions [B]            the position of row i's pending token (``last[i]``, not cached yet)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..components.decoder import KVCache
from ..components.sampler import SamplerState
from ..generation.loop import check_logits, prepare_prompt


class RunningBatch:
    """The rows decoding together (see the module docstring). ``rows`` are the engine's Row objects:
    each knows its job (budget ``job.max_new``), sampler chain and generator."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.rows: list = []
        self.part: _Part | None = None  # the cache and per-row state (None: no rows)

    def __len__(self) -> int:
        return len(self.rows)

    # ---- rows join ------------------------------------------------------------------------------
    def admit(self, rows: list, batch: dict) -> torch.Tensor:
        """Prefill the new rows' prompts (``batch``: collated, left padded) and repack them in after
        the running rows. Returns their first token ids [b] (already pending in ``last``)."""
        prompt = prepare_prompt(self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                batch["pixel_attention_mask"])
        b, length = prompt.input_ids.shape
        cache = self.model.decoder.new_cache(b, length)
        out = self.model(input_ids=prompt.input_ids, attention_mask=None if prompt.all_ones else prompt.mask,
                         position_ids=prompt.positions, pixel_values=prompt.pixel_values,
                         pixel_attention_mask=prompt.pixel_attention_mask, cache=cache, logits_to_keep=1)
        real = prompt.mask.sum(dim=1).tolist()
        check_logits(out.logits[:, -1], 0)
        state = SamplerState(tokens=prompt.input_ids, new_tokens=0, pad_lengths=prompt.pad_lengths)
        first = self._sample(rows, out.logits[:, -1], state)
        new = _Part(cache, prompt.mask, prompt.input_ids, prompt.positions[:, -1] + 1, first, real)
        self._repack(rows, new)
        return first

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """Feed every row's pending token; returns the next token ids [B] (now pending)."""
        part = self.part
        assert part is not None, "step() on an empty batch"
        length = part.cache.length
        part.mask[:, length] = 1
        part.tokens[:, length] = part.last
        out = self.model(input_ids=part.last[:, None], position_ids=part.positions[:, None],
                         attention_mask=part.mask[:, :length + 1], cache=part.cache, logits_to_keep=1)
        part.positions += 1
        part.real = [r + 1 for r in part.real]
        check_logits(out.logits[:, -1], max(row.tokens for row in self.rows))
        state = SamplerState(tokens=part.tokens[:, :length + 1], new_tokens=0,
                             pad_lengths=torch.tensor([length + 1 - r for r in part.real], device=part.tokens.device))
        part.last = self._sample(self.rows, out.logits[:, -1], state)
        return part.last

    def _sample(self, rows: list, logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
        """Each row picks its token with its own chain and generator (greedy rows: argmax)."""
        ids = ops.argmax_last(logits)
        assert state.tokens is not None
        for i, row in enumerate(rows):
            if row.greedy or row.finished:
                continue
            sub = SamplerState(tokens=state.tokens[i:i + 1], new_tokens=row.tokens, eos_token_ids=None,
                               generators=row.generator,
                               pad_lengths=None if state.pad_lengths is None else state.pad_lengths[i:i + 1])
            ids[i] = row.chain(logits[i:i + 1].float(), sub)[0]
        return ids

    # ---- rows leave -----------------------------------------------------------------------------
    def drop_finished(self) -> None:
        """Remove the finished rows (repacking the cache to the longest row left)."""
        if all(not row.finished for row in self.rows):
            return
        self._repack([], None)

    def clear(self) -> None:
        self.rows, self.part = [], None

    # ---- the cache's layout ---------------------------------------------------------------------
    def _repack(self, new_rows: list, new: "_Part | None") -> None:
        """One cache for the unfinished running rows followed by ``new_rows`` (from ``new``): each
        row's cached tokens moved to the right end of a cache as long as the longest row, with room
        for the longest remaining budget."""
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        sources = [(self.part, i) for i in keep if self.part is not None]
        sources += [(new, i) for i in range(len(new_rows))] if new is not None else []
        rows = [self.rows[i] for i in keep] + list(new_rows)
        if not rows:
            self.clear()
            return
        real = [part.real[i] for part, i in sources]
        length = max(real)
        budget = max(row.job.max_new - row.tokens for row in rows)
        max_length = length + max(budget, 0) + 1
        cache = self.model.decoder.new_cache(len(rows), max_length)
        template = _layers(sources[0][0].cache)
        device = template[0][0].device
        mask = torch.zeros((len(rows), max_length), dtype=torch.long, device=device)
        tokens = torch.full((len(rows), max_length), self.pad_id, dtype=torch.long, device=device)
        for layer, (k0, v0) in enumerate(template):
            shape = (len(rows), k0.shape[1], max_length, k0.shape[3])  # [B, Hkv, max_length, hd]
            cache.keys[layer] = k0.new_zeros(shape)
            cache.values[layer] = v0.new_zeros(shape)
        new_layers = _layers(cache)
        for dst, ((part, src), r) in enumerate(zip(sources, real)):
            end = part.cache.length
            for (k, v), (k_src, v_src) in zip(new_layers, _layers(part.cache)):
                k[dst, :, length - r:length] = k_src[src, :, end - r:end]
                v[dst, :, length - r:length] = v_src[src, :, end - r:end]
            mask[dst, length - r:length] = 1
            tokens[dst, length - r:length] = part.tokens[src, end - r:end]
        cache.advance(length)
        self.rows = rows
        self.part = _Part(cache, mask, tokens, torch.stack([part.positions[src] for part, src in sources]),
                          torch.stack([part.last[src] for part, src in sources]), real)
        ops.prepare_decode(self.model.decoder, len(rows))  # bf16 on CPU: packed weights where they pay


def _layers(cache: KVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) buffers: all allocated once a prefill has run."""
    out = []
    for k, v in zip(cache.keys, cache.values):
        assert k is not None and v is not None, "a KV cache layer was never written"
        out.append((k, v))
    return out


@dataclass
class _Part:
    """Rows of one cache: the cache, its mask and token history [B, max_length], each row's next
    position and pending token [B], and how many tokens each row has cached."""

    cache: KVCache
    mask: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    real: list[int]
