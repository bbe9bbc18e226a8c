"""A short training loop for idefics3_kit models, and the collator that feeds it.

AdamW with linear warmup and cosine decay, gradient clipping, gradient accumulation, optional
bf16 autocast, per-component freezing, a progress bar with loss and tokens/s, and checkpoints
that resume: weights through ``save_pretrained`` (the Hugging Face layout), plus the optimizer,
scheduler and step in ``trainer_state.pt``.

    idefics3-kit train --config configs/demo_train.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import VLMConfig
from .model import VLM

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
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}; known: {sorted(known)}")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


# ---- data ------------------------------------------------------------------------------------


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


class Collator:
    """Examples (image, question, answer) -> a right-padded training batch.

    Labels are -100 everywhere except the assistant's answer (and the end-of-utterance token
    that closes it), so the loss teaches answering, not predicting prompts or image tokens.
    The whole batch goes through the processor once; each row's answer tokens are found at
    its end (the text after the generation prompt, tokenized alone, must be the row's tail,
    which is checked).
    """

    def __init__(self, processor, pad_token_id: int | None = None):
        self.processor = processor
        self.pad_token_id = pad_token_id

    def answer_suffix(self, question: str, answer: str) -> str:
        proc = self.processor
        prompt = proc.apply_chat_template(chat_messages(question), add_generation_prompt=True)
        full = proc.apply_chat_template(chat_messages(question, answer))
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the generation prompt with the answer")
        return full[len(prompt):]

    def __call__(self, examples) -> dict:
        proc = self.processor
        suffixes = [self.answer_suffix(e.question, e.answer) for e in examples]
        texts = [proc.apply_chat_template(chat_messages(e.question, e.answer)) for e in examples]
        batch = proc(text=texts, images=[[e.image] for e in examples], return_tensors="pt", padding=True,
                     padding_side="right")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, -100)
        for i, suffix in enumerate(suffixes):
            answer_ids = torch.tensor(proc.tokenizer.encode(suffix, add_special_tokens=False), dtype=torch.long)
            end = int(mask[i].sum())
            start = end - answer_ids.shape[0]
            if not torch.equal(ids[i, start:end], answer_ids):
                raise ValueError(f"example {i}: the answer {suffix!r} does not tokenize the same inside the "
                                 "prompt; cannot mask labels")
            labels[i, start:end] = answer_ids
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": batch["pixel_values"], "pixel_attention_mask": batch["pixel_attention_mask"]}


def synthetic_batches(data_cfg: dict, batch_size: int, start_index: int = 0, examples_per_step: int | None = None):
    """Endless batches of synthetic examples; example i is a pure function of (seed, i, stage).

    ``data_cfg["kinds"]`` lists the question kinds to draw from (a kind listed twice is drawn
    twice as often; default: the evaluation's kinds) and ``data_cfg["max_shapes"]`` caps the
    shapes per image. ``data_cfg["stages"]`` is a curriculum: a list of
    ``{"until_step": N, "kinds": [...], "max_shapes": M}`` whose settings apply before optimizer
    step N (first match wins), the top-level ones after the last.
    """
    from .synthetic import QUESTION_KINDS, make_example

    seed = int(data_cfg.get("seed", 0))
    per_step = examples_per_step or batch_size
    index = start_index
    while True:
        stage = data_stage(data_cfg, index // per_step)
        kinds = tuple(stage.get("kinds", data_cfg.get("kinds", QUESTION_KINDS)))
        max_shapes = int(stage.get("max_shapes", data_cfg.get("max_shapes", 3)))
        yield [make_example(seed * 1_000_003 + index + k, kinds=kinds, max_shapes=max_shapes)
               for k in range(batch_size)]
        index += batch_size


def data_stage(data_cfg: dict, step: int) -> dict:
    """The curriculum stage in force at optimizer ``step`` ({} once past every stage)."""
    for stage in data_cfg.get("stages", []):
        if "until_step" not in stage:
            raise ValueError(f"data.stages: every stage needs 'until_step', got {stage}")
        if step < int(stage["until_step"]):
            return stage
    return {}


# ---- model, optimizer, schedule ---------------------------------------------------------------


def build_model(model_cfg: dict, processor=None) -> VLM:
    """A model from ``{"init": dir}``, ``{"demo": true, ...}``, ``{"preset": name, ...}`` or a VLMConfig dict
    (``demo`` and ``preset`` take per-component overrides: ``"decoder": {"hidden_size": 256}``)."""
    spec = dict(model_cfg)
    if "init" in spec:
        return VLM.from_pretrained(spec["init"])
    if spec.get("demo"):
        from .demo_model import demo_model_config

        tok = processor.tokenizer
        spec.pop("demo")
        cfg = demo_model_config(len(tok), processor.image_token_id, tok.pad_token_id,
                                processor.end_of_utterance_token_id)
        return VLM(with_overrides(cfg, spec))  # e.g. {"demo": true, "decoder": {"num_key_value_heads": 6}}
    if "preset" in spec:
        return VLM(with_overrides(VLMConfig.preset(spec.pop("preset")), spec))
    return VLM(VLMConfig.from_dict(spec))


def with_overrides(cfg: VLMConfig, overrides: dict) -> VLMConfig:
    """``cfg`` with per-component fields (``{"decoder": {...}}``) and top-level fields replaced;
    an unknown field is an error from ``replace``."""
    overrides = dict(overrides)
    parts = {kind: getattr(cfg, kind).replace(**overrides.pop(kind))
             for kind in ("vision", "connector", "decoder") if kind in overrides}
    return cfg.replace(**parts, **overrides) if parts or overrides else cfg


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


# ---- vision warm-up ---------------------------------------------------------------------------


WARMUP_KEYS = {"steps", "lr", "batch_size", "per_token", "word_fraction"}


def warm_up_vision(model: VLM, processor, spec: dict, seed: int = 0, progress: bool = True) -> float:
    """Pretrain the vision tower and connector on what each tile shows, before the VLM loop.

    A real Idefics3 starts from a pretrained SigLIP; a tower trained from scratch through the
    language loss alone learns colours (the mean of a tile) quickly but shapes and letters
    hardly at all (docs/training.md). This stage gives it that start on synthetic images:
    linear heads on the image features of each of the 2x2 tiles predict the shape and colour
    in that cell, and a head on the global tile's features predicts the word. The heads are
    dropped afterwards. Returns the last loss.

    ``spec["per_token"]`` (default true) applies the heads to every image token of a tile, not
    only to the tile's mean: the decoder answers "what colour is the circle?" by attending to
    the tokens that say "circle" and reading their colour, which is easiest when every token
    of the circle's tile says both (docs/training.md has the measured difference).
    ``spec["word_fraction"]`` (default 0.25) is the share of word images.
    """
    from tqdm.auto import tqdm

    from .synthetic import COLOURS, NO_LABEL, SHAPES, WORDS, make_tile_labels

    unknown = set(spec) - WARMUP_KEYS
    if unknown:
        raise ValueError(f"vision_warmup: unknown keys {sorted(unknown)}; expected some of {sorted(WARMUP_KEYS)}")
    steps, batch_size, lr = int(spec.get("steps", 0)), int(spec.get("batch_size", 32)), float(spec.get("lr", 1e-3))
    per_token = bool(spec.get("per_token", True))
    word_fraction = float(spec.get("word_fraction", 0.25))
    if steps <= 0:
        return float("nan")
    classes = {"shape": [NO_LABEL, *SHAPES], "colour": [NO_LABEL, *sorted(COLOURS)],
               "word": [NO_LABEL, *(w.lower() for w in WORDS)]}
    dim = model.decoder.hidden_size
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(dim, len(c)) for name, c in classes.items()})
    params = [*model.vision.parameters(), *model.connector.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    bar = tqdm(range(steps), disable=not progress, desc="vision warm-up")

    def target(name, values, repeat):
        return torch.tensor([classes[name].index(v) for v in values]).repeat_interleave(repeat)

    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        first = seed * 1_000_003 + 500_000_000 + step * batch_size
        items = [make_tile_labels(first + i, word_fraction) for i in range(batch_size)]
        batch = processor(text=["<image>"] * batch_size, images=[[it.image] for it in items], return_tensors="pt")
        pixels = batch["pixel_values"]  # [B, 5, 3, S, S]: 2x2 tiles then the global one
        if pixels.shape[1] != 5:
            raise ValueError(f"vision warm-up needs images split into 2x2 tiles + global, got {pixels.shape[1]} tiles")
        feats = model.get_image_features(pixels, batch["pixel_attention_mask"])  # [B*5, T, Dt]
        if not per_token:
            feats = feats.mean(dim=1, keepdim=True)  # [B*5, 1, Dt]
        tokens = feats.shape[1]
        feats = feats.view(batch_size, 5, tokens, dim)
        cells, glob = feats[:, :4].reshape(-1, dim), feats[:, 4].reshape(-1, dim)  # [B*4*T, Dt], [B*T, Dt]
        shapes = target("shape", [s for it in items for s in it.cell_shapes], tokens)
        colours = target("colour", [c for it in items for c in it.cell_colours], tokens)
        words = target("word", [it.word for it in items], tokens)
        loss = (F.cross_entropy(heads["shape"](cells), shapes) + F.cross_entropy(heads["colour"](cells), colours)
                + F.cross_entropy(heads["word"](glob), words))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress:  # accuracies of this batch (before the step) for the bar
            with torch.no_grad():
                has_word = words != 0
                word_acc = (heads["word"](glob[has_word]).argmax(-1) == words[has_word]).float().mean()
                shape_acc = (heads["shape"](cells).argmax(-1) == shapes).float().mean()
            bar.set_postfix(loss=f"{float(loss):.4f}", shape_acc=f"{float(shape_acc):.3f}",
                            word_acc=f"{float(word_acc):.3f}")
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


# ---- checkpoints ------------------------------------------------------------------------------

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


# ---- the loop ---------------------------------------------------------------------------------


def load_or_build_processor(proc_cfg: dict, out_dir: str):
    from .processing import Processor

    if "path" in proc_cfg:
        return Processor.from_pretrained(proc_cfg["path"])
    from .demo_model import build_processor

    return build_processor(os.path.join(out_dir, "processor"), **proc_cfg.get("build", {}))


def train(cfg: TrainConfig, progress: bool = True, stop_after: int | None = None) -> VLM:
    """Train (or resume) as ``cfg`` says; returns the trained model.

    ``stop_after`` ends this run after that many steps (a checkpoint is written) while the
    schedule still spans ``cfg.steps``: a time-boxed run that a later call resumes.
    """
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    last = os.path.join(cfg.out_dir, "last")
    resuming = os.path.exists(os.path.join(last, STATE_FILE))
    processor = load_or_build_processor({"path": last} if resuming else cfg.processor, cfg.out_dir)
    model = VLM.from_pretrained(last) if resuming else build_model(cfg.model, processor)
    model.train()
    if not resuming and cfg.vision_warmup:
        warm_up_vision(model, processor, cfg.vision_warmup, cfg.seed, progress)
    freeze(model, cfg.freeze)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start = load_trainer_state(last, optimizer, scheduler) if resuming else 0
    collate = Collator(processor)
    per_step = cfg.batch_size * cfg.grad_accum
    micro_batches = synthetic_batches(cfg.data, cfg.batch_size, start * per_step, per_step)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not progress, desc="train")
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


def main(argv=None) -> int:
    """``python -m idefics3_kit.train --config FILE`` (same as ``idefics3-kit train``)."""
    from .cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
