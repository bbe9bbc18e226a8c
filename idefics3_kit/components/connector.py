"""Connectors: vision hidden [N, P, Dv] -> text-space features [N, P/s², Dt].

``pixel_shuffle`` is Idefics3's: a space-to-depth shuffle that folds each s×s block of
patches into one token (s² fewer tokens, s² times wider), then a bias-free Linear to the
decoder's hidden size. Parameter names match ``model.connector.`` in the checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConnectorConfig
from ..registry import register


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[N, P, D] -> [N, P/s², s²·D] in transformers' token and channel order.

    The P patches form a square m·s × m·s grid (row-major). Output token t = i·m + j is the
    concatenation, for dh in 0..s-1 (outer) and dw in 0..s-1 (inner), of the D-vector of patch
    (i·s + dh, j·s + dw).
    """
    n, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"pixel_shuffle: {p} patches do not form a square grid")
    if side % scale != 0:
        raise ValueError(f"pixel_shuffle: grid side {side} is not divisible by scale factor {scale}")
    m = side // scale
    x = x.reshape(n, m, scale, m, scale, d)  # [N, i, dh, j, dw, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, i, j, dh, dw, D]
    return x.reshape(n, m * m, scale * scale * d)


def pixel_unshuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Inverse of ``pixel_shuffle``: [N, P/s², s²·D] -> [N, P, D]."""
    n, q, sd = x.shape
    m = math.isqrt(q)
    d = sd // (scale * scale)
    x = x.reshape(n, m, m, scale, scale, d)  # [N, i, j, dh, dw, D]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [N, i, dh, j, dw, D]
    return x.reshape(n, m * scale * m * scale, d)


class _Projection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _ShuffleThenProject(nn.Module):
    """Pixel shuffle by ``scale_factor``, then ``modality_projection`` (built by the subclass)."""

    config_class = ConnectorConfig

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        if not cfg.in_dim or not cfg.out_dim:
            raise ValueError("ConnectorConfig.in_dim/out_dim must be set (VLMConfig fills them in; "
                             f"got in_dim={cfg.in_dim}, out_dim={cfg.out_dim})")
        self.config = cfg
        self.scale_factor = cfg.scale_factor
        self.modality_projection = self.projection(cfg.in_dim * cfg.scale_factor ** 2, cfg)

    def projection(self, shuffled_dim: int, cfg: ConnectorConfig) -> nn.Module:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.modality_projection(pixel_shuffle(hidden, self.scale_factor))


@register("connector", "pixel_shuffle")
class PixelShuffleConnector(_ShuffleThenProject):
    """Pixel shuffle by ``scale_factor`` then a bias-free projection (Idefics3Connector)."""

    def projection(self, shuffled_dim: int, cfg: ConnectorConfig) -> nn.Module:
        return _Projection(shuffled_dim, cfg.out_dim)


class _MLPProjection(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


@register("connector", "mlp")
class MLPConnector(_ShuffleThenProject):
    """Pixel shuffle by ``scale_factor``, then Linear-GELU-Linear (LLaVA-style projector).

    [N, P, in_dim] -> shuffle [N, P/s², s²·in_dim] -> Linear(s²·in_dim, hidden_dim) -> GELU (erf)
    -> Linear(hidden_dim, out_dim), both with bias; ``hidden_dim`` 0 means out_dim. Parameters
    are ``modality_projection.linear_{1,2}`` (``model.connector.modality_projection.*`` in a
    saved checkpoint). ``scale_factor`` 1 gives LLaVA's plain two-layer projector.
    """

    def projection(self, shuffled_dim: int, cfg: ConnectorConfig) -> nn.Module:
        return _MLPProjection(shuffled_dim, cfg.hidden_dim or cfg.out_dim, cfg.out_dim)
