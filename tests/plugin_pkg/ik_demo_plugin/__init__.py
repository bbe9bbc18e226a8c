"""A third-party connector: average-pool each s x s block of patches, then project.

Importing this module registers it; idefics3_kit imports it through the entry point
``idefics3_kit.plugins: demo = ik_demo_plugin``.
"""

import torch
import torch.nn as nn

from idefics3_kit.config import ConnectorConfig
from idefics3_kit.registry import register


@register("connector", "demo_avgpool")
class AvgPoolConnector(nn.Module):
    config_class = ConnectorConfig

    def __init__(self, cfg: ConnectorConfig):
        super().__init__()
        self.scale = cfg.scale_factor
        self.proj = nn.Linear(cfg.in_dim, cfg.out_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n, p, d = hidden.shape
        side = int(round(p ** 0.5))
        grid = hidden.transpose(1, 2).reshape(n, d, side, side)  # [N, D, side, side]
        pooled = nn.functional.avg_pool2d(grid, self.scale)  # [N, D, side/s, side/s]
        return self.proj(pooled.flatten(2).transpose(1, 2))  # [N, P/s², out]
