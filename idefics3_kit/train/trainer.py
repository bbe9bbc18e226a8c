"""The Trainer: fine-tune a VLM on conversations, in one process or under torchrun.

    trainer = Trainer(model, processor, TrainConfig(...))     # or Trainer(config=...) to build both
    trainer.fit()                                             # resumes from OUT_DIR/checkpoints/latest
    trainer.export("out/hf", adapter=False)                   # a Hugging Face checkpoint

Each optimizer step takes ``batch_size`` examples (``sampling.GlobalOrder``), split over the
processes and into micro-batches. The loss of a step is the mean over every labelled token of the
whole step: each micro-batch's summed loss is divided by the step's label count over all
processes (``num_items_in_batch``, as transformers' Trainer does), so one process and N processes
give the same losses and gradients for the same global batch, whatever the padding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

from ..model import VLM
from ..processing import Processor
from . import adapters, checkpoint, distributed, sources
from .collator import ConversationCollator, measure_dataset
from .config import TrainConfig
from .data import ConversationDataset
from .metrics import MetricsLog
from .progress import progress_bar
from .sampling import GlobalOrder, StepMicroBatches, StepOrder

logger = logging.getLogger("idefics3_kit.train")

PROCESSOR_DIR = "processor"  # OUT_DIR/processor: the run's processor, saved when it starts
FINAL_DIR = "final"  # OUT_DIR/final: the Hugging Face checkpoint written at the end


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


class Trainer:
    """Train ``model`` (a VLM) with ``processor`` as ``config`` says; see docs/finetune.md."""

    def __init__(self, model: VLM | None = None, processor=None, config: TrainConfig | dict | None = None, *,
                 train_data=None, eval_data=None, progress: bool = True):
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config or {})
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.runtime = distributed.setup(cfg.device, cfg.parallel.strategy)
        self.progress = progress and self.runtime.is_main
        self.micro_batch, self.accum = cfg.micro_batches(self.runtime.world_size)
        fresh = checkpoint.latest(cfg.out_dir) is None
        torch.manual_seed(cfg.seed)  # every process builds the same initial weights
        if processor is None:  # a run's own processor (saved when it started) wins over the config's
            saved = os.path.join(cfg.out_dir, PROCESSOR_DIR)
            processor = (Processor.from_pretrained(saved) if os.path.isdir(saved)
                         else sources.processor(cfg.processor, cfg.model, cfg.out_dir))
        self.processor = processor
        self.model = model if model is not None else sources.model(cfg.model, processor, cfg, self.progress, fresh)
        self._given_data = (train_data, eval_data)
        self._data = None
        self.wrapped: torch.nn.Module | None = None  # the model in its DDP/FSDP2 wrapper, by _prepare()
        self.optimizer: torch.optim.Optimizer | None = None  # by _prepare()
        self.step = 0

    @property
    def train_data(self):
        return self._datasets()[0]

    @property
    def eval_data(self):
        return self._datasets()[1]

    # ---- data -----------------------------------------------------------------------------------
    def _datasets(self):
        """(train, eval) datasets, read and checked on first use."""
        if self._data is None:
            self._data = self._read_datasets(*self._given_data)
        return self._data

    def _read_datasets(self, train_data, eval_data):
        cfg = self.config
        if train_data is not None and not isinstance(train_data, ConversationDataset):
            cfg.data.source = train_data  # a datasets.Dataset or a path passed in Python
            train_data = None
        if isinstance(train_data, ConversationDataset) and train_data.lengths is None:
            measure_dataset(train_data, self.processor, cfg.data.max_length)
        train = train_data or sources.data(cfg.data, self.processor, global_batch=cfg.batch_size, steps=cfg.steps,
                                           seed=cfg.seed)
        if eval_data is None and cfg.eval.source is not None:
            eval_cfg = type(cfg.data)(source=cfg.eval.source, max_length=cfg.data.max_length,
                                      skip_bad_records=cfg.data.skip_bad_records)
            eval_data = sources.data(eval_cfg, self.processor, global_batch=1, steps=1, seed=cfg.seed,
                                     where="eval")
        elif eval_data is None and cfg.eval.fraction:
            train, eval_data = _hold_out(train, cfg.eval.fraction, cfg.seed)
        if train.skipped and self.runtime.is_main:
            logger.warning("%s: skipped %s", train.name, train.skipped)
        return train, eval_data

    def _loader(self, dataset, order: StepOrder, start: int, end: int, micro: int, accum: int) -> DataLoader:
        sampler = StepMicroBatches(order, self.runtime.rank, self.runtime.world_size, micro, accum, start, end)
        workers = self.config.data.num_workers
        return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                          collate_fn=ConversationCollator(self.processor, self.config.data.max_length),
                          prefetch_factor=2 if workers else None)

    # ---- the model ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """LoRA, what trains, gradient checkpointing, the device, the wrapper, the optimizer: once."""
        if self.wrapped is not None:
            return
        cfg, rt = self.config, self.runtime
        model = self.model
        if cfg.lora is not None:
            adapters.apply_lora(model, cfg.lora)
        adapters.set_trainable(model, cfg)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.to(rt.device).train()
        self.wrapped = distributed.wrap(model, cfg.parallel.strategy, rt, bf16=cfg.bf16,
                                        cpu_offload=cfg.parallel.cpu_offload,
                                        reshard_after_forward=cfg.parallel.reshard_after_forward)
        self.optimizer = adapters.optimizer(model, cfg)
        resume = checkpoint.latest(cfg.out_dir)
        if resume is not None:
            state = checkpoint.load(resume, self.wrapped, self.optimizer)
            self.step = int(state["step"])
            if rt.is_main:
                logger.info("resumed from %s (step %d, written by %d process(es))", resume, self.step,
                            state.get("world_size", 1))

    def _autocast(self):
        """bf16 autocast; FSDP2 runs bf16 through its MixedPrecisionPolicy instead."""
        fsdp = self.config.parallel.strategy == "fsdp2" and self.runtime.distributed
        return torch.autocast(self.runtime.device.type, dtype=torch.bfloat16, enabled=self.config.bf16 and not fsdp)

    # ---- training -------------------------------------------------------------------------------
    def fit(self, until: int | None = None) -> VLM:
        """Train from the last checkpoint (or the start) to ``steps``; returns the (unwrapped) model.

        ``until`` stops earlier, after that step (a checkpoint is written there), while the
        schedule still spans ``steps``: a time-boxed run that a later ``fit`` resumes, at any
        world size. The Hugging Face export to OUT_DIR/final happens when ``steps`` is reached.
        """
        cfg, rt = self.config, self.runtime
        end = cfg.steps if until is None else min(int(until), cfg.steps)
        self._prepare()
        saved = os.path.join(cfg.out_dir, PROCESSOR_DIR)
        if rt.is_main and not os.path.isdir(saved):
            self.processor.save_pretrained(saved)
        order = GlobalOrder(len(self.train_data), cfg.batch_size, cfg.seed,
                            self.train_data.lengths if cfg.data.group_by_length else None, cfg.data.shuffle,
                            getattr(self.train_data, "ordered", False))
        log = MetricsLog(cfg.out_dir, rt.is_main, cfg.tensorboard)
        batches = iter(self._loader(self.train_data, order, self.step, end, self.micro_batch, self.accum))
        bar = progress_bar(range(self.step, end), initial=self.step, total=cfg.steps, desc="train",
                           disable=not self.progress)
        try:
            for step in bar:
                started = time.perf_counter()
                stats = self._train_step(step, [next(batches) for _ in range(self.accum)])
                self.step = step + 1
                stats["tokens_per_s"] = stats.pop("tokens") / (time.perf_counter() - started)
                if self.config.eval.every and self.eval_data is not None and self.step % cfg.eval.every == 0:
                    stats.update(self.evaluate())
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    log.log(self.step, stats)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
                if self.step % cfg.save_every == 0 or self.step == end:
                    self.save_checkpoint()
            if self.step == cfg.steps and self.eval_data is not None and not cfg.eval.every:
                log.log(self.step, self.evaluate())
        finally:
            log.close()
        if self.step == cfg.steps:
            self.export(os.path.join(cfg.out_dir, FINAL_DIR))
        return self.model

    @classmethod
    def from_run(cls, out_dir: str, progress: bool = True) -> "Trainer":
        """The trainer of a run at its newest checkpoint (its config, processor and weights), e.g.
        to export it or train it further."""
        path = checkpoint.latest(out_dir)
        if path is None:
            raise ValueError(f"{out_dir}: no checkpoint (expected {os.path.join(out_dir, checkpoint.FOLDER)})")
        state = checkpoint.read_state(path)
        config = TrainConfig.from_dict(state["config"], f"{path}/{checkpoint.STATE_FILE} config")
        config.out_dir = out_dir
        trainer = cls(config=config, progress=progress)
        trainer._prepare()
        return trainer

    def _train_step(self, step: int, micro_batches: list[dict]) -> dict:
        cfg, rt = self.config, self.runtime
        torch.manual_seed(cfg.seed + step)  # dropout and the like: the same whatever the resume point
        assert self.optimizer is not None  # fit() ran _prepare()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        inputs = [mb["inputs"] for mb in micro_batches]
        counts = torch.tensor([sum(_label_count(x) for x in inputs), sum(_real_tokens(x)[0] for x in inputs),
                               sum(_real_tokens(x)[1] for x in inputs)], dtype=torch.float64)
        labels, real, total = distributed.all_reduce_sum(counts, rt).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(inputs):
            with self._sync(k == len(inputs) - 1):
                loss = self._loss(batch, max(labels, 1.0))
                (loss * rt.world_size).backward()  # the wrappers average gradients over the processes
            loss_sum += loss.detach().double() * max(labels, 1.0)
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        skipped: dict[str, int] = {}
        for mb in micro_batches:
            for reason, n in mb["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        total_loss = distributed.all_reduce_sum(loss_sum, rt).item()
        stats = {"loss": total_loss / max(labels, 1.0), "lr": self.optimizer.param_groups[0]["lr"],
                 "grad_norm": grad_norm, "tokens": real, "padded_fraction": 1 - real / max(total, 1.0),
                 "label_tokens": int(labels)}
        if skipped:
            stats["skipped"] = skipped
            logger.warning("step %d: skipped %s", step, skipped)
        return stats

    def _loss(self, batch: dict | None, num_items: float) -> torch.Tensor:
        """This micro-batch's summed loss over the step's label count; a stand-in with zero loss
        when the micro-batch is empty (every example skipped), so the processes stay in step."""
        device = self.runtime.device
        if batch is None:
            batch = self._empty_batch()
        batch = {k: v.to(device) for k, v in batch.items()}
        assert self.wrapped is not None  # fit() ran _prepare()
        with self._autocast():
            loss = self.wrapped(**batch, num_items_in_batch=num_items, loss_only=True).loss
            if "pixel_values" not in batch and self.runtime.distributed:
                loss = loss + 0.0 * self._vision_touch()  # every parameter takes part in every step
        return loss.float()

    def _vision_touch(self) -> torch.Tensor:
        size = self.model.config.vision.image_size
        pixels = torch.full((1, 1, 3, size, size), 0.5, device=self.runtime.device)
        return self.model.get_image_features(pixels).sum()

    def _empty_batch(self) -> dict:
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((1, 1), pad, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}

    def _sync(self, last: bool):
        """Gradient sync only on the last micro-batch of a step."""
        wrapped = self.wrapped
        assert wrapped is not None  # fit() ran _prepare()
        if last or not self.runtime.distributed:
            return contextlib.nullcontext()
        if hasattr(wrapped, "no_sync"):  # DDP
            return cast("DistributedDataParallel", wrapped).no_sync()
        if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(wrapped)
        return contextlib.nullcontext()

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The eval split's loss (mean over its label tokens) and, with ``eval.exact_match``, the
        share of last assistant turns generated exactly."""
        self._prepare()
        cfg, rt = self.config, self.runtime
        data = self.eval_data
        if data is None:
            raise ValueError("no eval split: set eval.source or eval.fraction")
        n = len(data) if cfg.eval.max_examples is None else min(len(data), cfg.eval.max_examples)
        batch = self.micro_batch * rt.world_size
        steps = max(1, math.ceil(n / batch))
        order = _EvalOrder(n, batch)
        assert self.wrapped is not None  # made by self._prepare() above
        self.wrapped.eval()
        try:
            totals = torch.zeros(2, dtype=torch.float64)
            for mb in self._loader(data, order, 0, steps, self.micro_batch, 1):
                inputs = mb["inputs"]
                if inputs is None:
                    continue
                count = _label_count(inputs)
                with self._autocast():
                    loss = self.wrapped(**{k: v.to(rt.device) for k, v in inputs.items()},
                                        num_items_in_batch=max(count, 1), loss_only=True).loss
                totals += torch.tensor([float(loss) * count, count], dtype=torch.float64)
            loss_sum, count = distributed.all_reduce_sum(totals, rt).tolist()
            out = {"eval_loss": loss_sum / max(count, 1.0)}
            if cfg.eval.exact_match:
                out["eval_exact_match"] = self._exact_match(data, order, steps)
        finally:
            self.wrapped.train()
        return out

    def _exact_match(self, data, order, steps: int) -> float:
        """Generate each example's last assistant turn (greedy, a fixed number of steps on every
        process so that sharded models stay in step) and compare it with the data's."""
        rt, proc = self.runtime, self.processor
        hits = torch.zeros(2, dtype=torch.float64)
        for step in range(steps):
            shard = order.shard(step, rt.rank, rt.world_size)
            prompts, images, answers = [], [], []
            for index in shard:
                conversation, imgs = data[index]
                last = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
                prompts.append(proc.apply_chat_template(conversation.messages[:last], add_generation_prompt=True))
                images.append(imgs[:sum(c["type"] == "image" for m in conversation.messages[:last]
                                        for c in m["content"])])
                answers.append("".join(c["text"] for c in conversation.messages[last]["content"]
                                       if c["type"] == "text").strip())
            batch = proc(text=prompts, images=images if any(images) else None, padding=True, padding_side="left",
                         add_special_tokens=not proc.template_writes_bos(prompts[0])).to(rt.device)
            with self._autocast():
                ids = self.model.generate(**batch, max_new_tokens=self.config.eval.max_new_tokens,
                                          min_new_tokens=self.config.eval.max_new_tokens, eos_token_id=[])
            eos = self.model.generation_config.get("eos_token_id", self.model.config.decoder.eos_token_id)
            for row, answer in zip(ids[:, batch["input_ids"].shape[1]:].tolist(), answers):
                row = _cut_at(row, eos)
                hits += torch.tensor([float(proc.decode(row, skip_special_tokens=True).strip() == answer), 1.0],
                                     dtype=torch.float64)
        right, total = distributed.all_reduce_sum(hits, rt).tolist()
        return right / max(total, 1.0)

    # ---- checkpoints and export -----------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """A DCP checkpoint of the current step (every process calls it)."""
        self._prepare()
        return checkpoint.save(self.config.out_dir, self.step, self.wrapped, self.optimizer, self.runtime,
                               {"config": _jsonable_config(self.config)}, keep=self.config.keep_checkpoints)

    def export(self, path: str, adapter: bool = False) -> str:
        """A Hugging Face checkpoint of the model and the processor at ``path`` (every process
        calls it; rank 0 writes). LoRA is merged into the weights, or with ``adapter=True`` written
        alone in peft's layout for transformers' Idefics3ForConditionalGeneration."""
        if adapter:
            if self.config.lora is None:
                raise ValueError("export(adapter=True): this run trains no LoRA adapters")
            state = _gathered_parameters(self.model)
            if self.runtime.is_main:
                adapters.save_adapter(self.model, path, self.config.lora, state)
        else:
            self.model.save_pretrained(path)  # a collective with distributed parameters
        if self.runtime.is_main:
            self.processor.save_pretrained(path)
        distributed.barrier(self.runtime)
        return path


class _EvalOrder:
    """Eval examples in their own order, ``batch`` per step, the last step padded by wrapping round."""

    def __init__(self, size: int, batch: int):
        self.size, self.batch = size, batch

    def shard(self, step: int, rank: int, world_size: int) -> list[int]:
        indices = [(step * self.batch + i) % self.size for i in range(self.batch)]
        return indices[rank::world_size]


def _hold_out(dataset: ConversationDataset, fraction: float, seed: int):
    """Split off ``fraction`` of the records (a fixed random choice) as the eval split."""
    n = len(dataset)
    held = max(1, int(round(n * fraction)))
    order = np.random.default_rng([seed, 7]).permutation(n)
    pick = sorted(order[:held].tolist())
    keep = sorted(order[held:].tolist())
    return _subset(dataset, keep), _subset(dataset, pick)


def _subset(dataset: ConversationDataset, indices: list[int]) -> ConversationDataset:
    part = ConversationDataset([dataset.conversations[i] for i in indices], dataset.name, dataset.skipped,
                               dataset.skip_bad_records)
    part.lengths = None if dataset.lengths is None else [dataset.lengths[i] for i in indices]
    part.ordered = False
    return part


def _label_count(inputs: dict | None) -> int:
    if inputs is None:
        return 0
    return int((inputs["labels"][:, 1:] != -100).sum())


def _real_tokens(inputs: dict | None) -> tuple[int, int]:
    if inputs is None:
        return 0, 0
    mask = inputs["attention_mask"]
    return int(mask.sum()), mask.numel()


def _cut_at(row: list[int], eos) -> list[int]:
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    for i, token in enumerate(row):
        if token in stops:
            return row[:i]
    return row


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _gathered_parameters(model) -> dict:
    """Every parameter as a full tensor (a collective when they are distributed)."""
    out = {}
    for name, param in model.named_parameters():
        value = param.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value
    return out


def _jsonable_config(cfg: TrainConfig) -> dict:
    """The config as plain JSON data (a datasets.Dataset source becomes its description)."""
    data = cfg.to_dict()
    for section in ("data", "eval"):
        source = data[section]["source"]
        if source is not None and not isinstance(source, (str, int, float, bool)):
            data[section]["source"] = f"<{type(source).__name__}>"
    return data
