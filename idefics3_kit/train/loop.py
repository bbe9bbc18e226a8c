"""The training loop: AdamW with linear warmup and cosine decay, gradient clipping and
accumulation, optional bf16 autocast, per-component freezing, a progress bar with loss and
tokens/s, and checkpoints that resume: weights through ``save_pretrained`` (the Hugging Face
layout), plus the optimizer, scheduler and step in ``trainer_state.pt``.

Where the processor, the model and the data come from is named in the config and resolved
through ``sources``: a checkpoint path, a preset or a config dict are built in; a recipe adds
its own (the demo's synthetic data and demo model, ``idefics3_kit.recipes.demo``).

    idefics3-kit train --config configs/demo_train.json
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from ..model import VLM
from ..processing import Processor
from . import sources
from .collator import Collator
from .config import COMPONENTS, TrainConfig
from .progress import progress_bar


def freeze(model: VLM, components) -> None:
    for name in COMPONENTS:
        for p in getattr(model, name).parameters():
            p.requires_grad_(name not in components)


def make_optimizer(model: VLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices (not on norms, biases or 1-D parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every component is frozen")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


STATE_FILE = "trainer_state.pt"


def save_checkpoint(path: str, model: VLM, processor, optimizer, scheduler, step: int, cfg: TrainConfig) -> None:
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "config": dataclasses.asdict(cfg), "rng": torch.get_rng_state()},
               os.path.join(path, STATE_FILE))


def load_trainer_state(path: str, optimizer, scheduler) -> int:
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> VLM:
    """Train (or resume) as ``cfg`` says; returns the trained model.

    ``stop_after`` ends this run after that many steps (a checkpoint is written) while the
    schedule still spans ``cfg.steps``: a time-boxed run that a later call resumes.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    last = os.path.join(cfg.out_dir, "last")
    resuming = os.path.exists(os.path.join(last, STATE_FILE))
    processor = Processor.from_pretrained(last) if resuming else sources.processor(cfg.processor, cfg.out_dir)
    model = VLM.from_pretrained(last) if resuming else sources.model(cfg.model, processor, cfg, progress)
    model.train()
    freeze(model, cfg.freeze)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = load_trainer_state(last, optimizer, scheduler) if resuming else 0
    collate = Collator(processor)
    per_step = cfg.batch_size * cfg.grad_accum
    micro_batches = sources.data(cfg.data, cfg.batch_size, start * per_step, per_step)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = progress_bar(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="train")
    for step in bar:
        t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
        for _ in range(cfg.grad_accum):
            batch = collate(next(micro_batches))
            tokens += int(batch["attention_mask"].sum())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(**batch).loss / cfg.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
                        lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save_checkpoint(last, model, processor, optimizer, scheduler, step + 1, cfg)
    return model.eval()


