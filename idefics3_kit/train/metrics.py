"""What a run reports: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard.

Written by rank 0 only. Each line is appended and flushed, so the file is readable while the run
goes on and a crash loses at most the line being written.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TextIO

logger = logging.getLogger("idefics3_kit.train")

FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool | None):
        self.enabled = enabled
        self.file: TextIO | None = None
        self.writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(os.path.join(out_dir, FILE), "a", encoding="utf-8")
        if tensorboard is not False:
            self.writer = _summary_writer(os.path.join(out_dir, "tensorboard"), required=tensorboard is True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        assert self.file is not None  # opened in __init__ when enabled
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _summary_writer(path: str, required: bool):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if required:
            raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
        return None
    return SummaryWriter(path)


def read(out_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    with open(os.path.join(out_dir, FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
