"""Which examples make each optimizer step: a pure function of the seed and the step.

The order depends on the global batch size alone, never on how many processes share it, so a run
resumed at another world size sees the same examples in the same steps. Within a step, process
``r`` of ``W`` takes examples ``r, r + W, ...`` of the (length-sorted) global batch, so every
process gets a similar share of tokens, and splits them into micro-batches.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

MEGABATCH = 16  # global batches sorted together when grouping by length


class GlobalOrder:
    """The global batches of a run, epoch after epoch.

    ``lengths`` (tokens per example) groups examples of similar lengths into the same batch
    (less padding): each epoch's permutation is cut into megabatches of ``MEGABATCH`` global
    batches, sorted by length inside, cut into global batches, and the batches shuffled.
    ``ordered`` keeps the data's own order (a stream such as the demo's synthetic source).
    """

    def __init__(self, size: int, global_batch: int, seed: int = 0, lengths=None, shuffle: bool = True,
                 ordered: bool = False):
        if size < global_batch:
            raise ValueError(f"the data has {size} usable examples, fewer than one step's batch_size "
                             f"{global_batch}; lower batch_size or add data")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.shuffle, self.ordered = shuffle, ordered
        self.steps_per_epoch = size // global_batch
        self._epoch_cache: tuple[int, list] | None = None

    def step(self, step: int) -> list[int]:
        """The example indices of optimizer step ``step`` (longest first when grouped by length)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[position]

    def shard(self, step: int, rank: int, world_size: int) -> list[int]:
        return self.step(step)[rank::world_size]

    def _epoch(self, epoch: int) -> list:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        g, n = self.global_batch, self.steps_per_epoch * self.global_batch
        if self.ordered:
            batches = [list(range(s * g, (s + 1) * g)) for s in range(self.steps_per_epoch)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
            order = order[:n]
            if self.lengths is not None:
                mega = g * MEGABATCH
                chunks = [order[i:i + mega] for i in range(0, n, mega)]
                order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
            batches = [order[i:i + g].tolist() for i in range(0, n, g)]
            if self.shuffle and self.lengths is not None:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches


class StepOrder(Protocol):
    """What StepMicroBatches reads: the indices of one optimizer step for one process
    (GlobalOrder for training, the trainer's _EvalOrder for evaluation)."""

    def shard(self, step: int, rank: int, world_size: int) -> list[int]: ...


class StepMicroBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler for one process: ``accum`` micro-batches per step, from
    ``start`` to ``end``."""

    def __init__(self, order: StepOrder, rank: int, world_size: int, micro_batch: int, accum: int,
                 start: int, end: int):
        self.order, self.rank, self.world_size = order, rank, world_size
        self.micro_batch, self.accum, self.start, self.end = micro_batch, accum, start, end

    def __iter__(self):
        for step in range(self.start, self.end):
            shard = self.order.shard(step, self.rank, self.world_size)
            for k in range(self.accum):
                yield shard[k * self.micro_batch:(k + 1) * self.micro_batch]

    def __len__(self) -> int:
        return (self.end - self.start) * self.accum
