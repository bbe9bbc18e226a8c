"""What ``generate(return_dict_in_generate=True)`` returns: transformers' GenerateDecoderOnlyOutput
and GenerateBeamDecoderOnlyOutput fields, read by attribute, by key or by position."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class GenerateOutput:
    """sequences [B * num_return_sequences, L + n]; scores / logits: one [rows, V] tensor per step
    (processed scores / raw logits, with ``output_scores`` / ``output_logits``); beam search adds
    sequences_scores [rows] (with ``output_scores``) and beam_indices [rows, n]."""

    sequences: torch.Tensor
    scores: tuple | None = None
    logits: tuple | None = None
    sequences_scores: torch.Tensor | None = None
    beam_indices: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        """The fields that are set, in order (transformers' ModelOutput.to_tuple)."""
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r} is not set in this output (set: {', '.join(self.keys())})")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())
