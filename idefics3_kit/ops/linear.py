"""Few-row bf16 linear for decode steps: ``decode_linear(x, weights, biases)``.

A one-token decode step reads every decoder weight once for one row of activations; that is
bandwidth work, and at the decoder's narrow shapes (K = 576) oneDNN's bf16 matmul streams the
weights 1.2-1.7x slower than the compiled loop (benchmarks/linear_cpu.py). The op also
takes several weights at once (q|k|v, gate|up) and writes their outputs side by side, so fused
projections need no concatenated weight copy.

``decode_linear`` returns None when the compiled kernel does not apply (the caller then runs its
usual ``F.linear`` path): not bf16 on a CPU with AVX-512 BF16, more than ``MAX_ROWS`` rows,
autograd on, the reference backend forced, or the extension absent.
"""

from __future__ import annotations

import functools

import torch

from . import _library

# Rows up to which the kernel is used (measured at SmolVLM-256M shapes, 2 threads): one row
# 1.2-1.7x faster than oneDNN, two ~1.2x, four about even per projection (0.8-1.5x; vdpbf16ps
# turns compute-bound while oneDNN's AMX path shares each weight load). Up to four rows it still
# pays: it lets decode_layers run the whole step (bf16 batch 4 decode 1.56x -> 1.97x transformers).
MAX_ROWS = 4


def decode_linear_ref(x: torch.Tensor, weights, biases=None) -> torch.Tensor:
    """Reference: each weight's linear accumulated in float32, bias added, rounded once to x's
    dtype; the outputs concatenated on the last dim."""
    biases = biases if biases is not None else [None] * len(weights)
    outs = []
    for w, b in zip(weights, biases):
        y = x.float() @ w.float().T
        outs.append((y if b is None else y + b.float()).to(x.dtype))
    return torch.cat(outs, dim=-1)


@functools.lru_cache(maxsize=1)
def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs the kernel's vectorized path (Linux /proc/cpuinfo; else False)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def covers(rows: int, dtype: torch.dtype) -> bool:
    """Whether the compiled kernel runs here for ``rows`` rows of ``dtype`` (bf16, at most
    MAX_ROWS rows, no autograd, the compiled backend, a CPU with AVX-512 BF16)."""
    return (dtype == torch.bfloat16 and rows <= MAX_ROWS and not torch.is_grad_enabled()
            and _library.use_compiled() and hasattr(torch.ops.idefics3_kit, "decode_linear")
            and cpu_has_avx512_bf16())


def applies(x: torch.Tensor, weights, biases=None) -> bool:
    """Whether ``decode_linear`` would run the compiled kernel for this input, weights [N_i, K]
    (a tensor or a sequence) and biases; anything the op would refuse (a non-contiguous or
    non-bf16 weight, a bias of another shape or dtype) makes it False, so callers fall back."""
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    if x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] == 0 or not weights:
        return False
    if not covers(x.numel() // x.shape[-1], x.dtype):
        return False
    for w in weights:
        if not (w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous()
                and w.shape[1] == x.shape[-1]):
            return False
    for w, b in zip(weights, biases or []):
        if b is not None and not (b.device.type == "cpu" and b.dim() == 1 and b.shape[0] == w.shape[0]
                                  and b.dtype in (torch.bfloat16, torch.float32)):
            return False
    return True


def decode_linear(x: torch.Tensor, weights, biases) -> torch.Tensor | None:
    """x [..., K] @ each of ``weights`` [N_i, K] (+ bias) -> [..., sum N_i], or None when the
    compiled kernel does not apply."""
    if not applies(x, weights, biases):
        return None
    return torch.ops.idefics3_kit.decode_linear(x, list(weights), list(biases))
