"""The training configuration: one dataclass, read from JSON with unknown fields refused."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .. import files

COMPONENTS = ("vision", "connector", "decoder")


@dataclass
class TrainConfig:
    out_dir: str = "runs/demo"
    model: dict = field(default_factory=lambda: {"demo": True})  # see build_model
    processor: dict = field(default_factory=dict)  # {"path": dir} or {"build": {...}} (see demo_model.py)
    data: dict = field(default_factory=lambda: {"source": "synthetic", "seed": 0})
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    max_grad_norm: float = 1.0
    bf16: bool = False
    freeze: list = field(default_factory=list)  # component names to keep fixed
    save_every: int = 250
    seed: int = 0
    num_threads: int = 0  # 0: torch's default
    vision_warmup: dict = field(default_factory=dict)  # {"steps": N, "lr": x, ...}: see warm_up_vision

    def __post_init__(self):
        bad = [c for c in self.freeze if c not in COMPONENTS]
        if bad:
            raise ValueError(f"TrainConfig.freeze: unknown components {bad}; choose from {list(COMPONENTS)}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")

    @classmethod
    def from_file(cls, path: str) -> "TrainConfig":
        if not os.path.exists(path):
            raise FileNotFoundError(f"training config not found: {path}")
        data = files.read_json_object(path, "training config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)
