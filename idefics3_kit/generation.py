"""KV cache and generation.

The cache is preallocated once per generation for the whole sequence (prompt + new
tokens): each layer writes its new keys/values into place, nothing is concatenated per step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Static per-layer key/value buffers [B, Hkv, max_length, head_dim].

    ``length`` counts the tokens already written; the decoder writes L new tokens at
    ``[length, length + L)`` in every layer, then calls ``advance(L)`` once.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, Hkv, L, hd] after the cached tokens; return views of all tokens so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_length {self.max_length}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (e.g. to drop finished sequences)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
