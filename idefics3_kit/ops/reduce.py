"""argmax over the vocabulary: greedy decoding's last step, written so CPUs reduce it quickly.

torch's CPU argmax walks the row one element at a time: over a 49k-entry vocabulary it took
234 µs for one bf16 row and 1.75 ms for eight (one thread), a tenth of an int4 decode step of
SmolVLM-256M. ``argmax_last`` gives the same index as ``torch.argmax`` (first occurrence on ties;
a NaN counts as the largest value, the first NaN wins) by one of two means:

- the compiled op (float32 / bfloat16 on CPU; csrc/include/idefics3_kit/argmax.h): two
  vectorized passes over integer keys with the floats' order, ~5 µs for a bf16 row of 49k;
- without the extension (and for float16 / float64), a blocked composition of ATen ops: the
  maximum of each block of ``BLOCK`` entries (``amax``, vectorized), the first block holding the
  largest of them, then the first position of that maximum inside that block (``amax``
  propagates NaN into its block's maximum, so the first NaN still wins). It is eight dispatched
  ops, ~37 µs hot and ~115 µs inside a decode step, whose weight stream has evicted their
  metadata from the caches: what the compiled op removes.

``python benchmarks/argmax.py`` measures them side by side. The ordinary ``torch.argmax`` runs
off CPU, for short rows, under torch.compile and for tensor subclasses (``fast_path.plain_tensors``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _library, fast_path

BLOCK = 128  # entries per block: a few AVX-512 vectors, and V / BLOCK stays small
MIN_LENGTH = 4 * BLOCK  # shorter rows: torch.argmax is already as fast
COMPILED_DTYPES = (torch.float32, torch.bfloat16)


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)``, exactly (index of the first maximum; NaN counts as the maximum)."""
    length = x.shape[-1] if x.dim() else 0
    if (length < MIN_LENGTH or not x.is_floating_point() or torch.compiler.is_compiling()
            or fast_path.plain_tensors([x]) != "cpu"):
        return x.argmax(dim=-1)
    if x.dtype in COMPILED_DTYPES and _library.has_kernel("argmax_last", "cpu"):
        return _library.op("argmax_last")(x)
    return argmax_blocked(x)


def argmax_blocked(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for a floating-point x with a last dim of at least one entry, as
    blocked ATen ops (the module docstring says how)."""
    length = x.shape[-1]
    pad = -length % BLOCK
    if pad:  # -inf never beats a real entry, and a row of only -inf still answers 0 as argmax does
        x = F.pad(x, (0, pad), value=float("-inf"))
    blocks = x.reshape(-1, x.shape[-1] // BLOCK, BLOCK)  # [rows, V / BLOCK, BLOCK]
    first_block = blocks.amax(dim=-1).argmax(dim=-1)  # [rows]
    rows = torch.arange(blocks.shape[0], device=x.device)
    inside = blocks[rows, first_block].argmax(dim=-1)  # [rows] position inside that block
    return (first_block * BLOCK + inside).reshape(x.shape[:-1])


@_library.register_fake("argmax_last")
def _argmax_last_fake(x):
    return torch.empty(x.shape[:-1], dtype=torch.long, device=x.device)
