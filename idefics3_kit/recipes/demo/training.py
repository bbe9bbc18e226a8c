"""The demo recipe's part of training: the synthetic data source, the demo model (with its
vision warm-up) and the processor it builds, registered with the trainer's sources.

    idefics3-kit train --config configs/demo_train.json    # data.source "synthetic", model {"demo": true, ...}
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ...model import VLM
from ...processing.images import to_rgb
from ...train import sources
from ...train.collator import chat_messages
from ...train.data import Conversation
from ...train.progress import progress_bar
from .model import build_processor, demo_model_config
from .synthetic import COLOURS, NO_LABEL, QUESTION_KINDS, SHAPES, WORDS, make_example, make_tile_labels


SYNTHETIC_OPTIONS = {"seed", "kinds", "max_shapes", "stages"}


class SyntheticConversations(torch.utils.data.Dataset):
    """The demo's synthetic questions as a training source: example i is a pure function of
    (seed, i, the curriculum stage of its step), drawn in order (``ordered``), ``steps`` steps of
    ``global_batch`` examples.

    ``options["kinds"]`` lists the question kinds to draw from (a kind listed twice is drawn twice
    as often; default: the evaluation's kinds) and ``options["max_shapes"]`` caps the shapes per
    image. ``options["stages"]`` is a curriculum: a list of ``{"until_step": N, "kinds": [...],
    "max_shapes": M}`` whose settings apply before optimizer step N (first match wins), the
    top-level ones after the last.
    """

    ordered = True
    lengths = None  # every image is small and alike: nothing to group

    def __init__(self, options: dict, global_batch: int, steps: int):
        unknown = sorted(set(options) - SYNTHETIC_OPTIONS)
        if unknown:
            raise ValueError(f"data.options: unknown key(s) {unknown} for the synthetic source; known: "
                             f"{sorted(SYNTHETIC_OPTIONS)}")
        for stage in options.get("stages", []):
            if "until_step" not in stage:
                raise ValueError(f"data.options.stages: every stage needs 'until_step', got {stage}")
        self.options, self.global_batch, self.steps = dict(options), global_batch, steps
        self.name = "synthetic"
        self.skipped: dict = {}

    def __len__(self) -> int:
        return self.global_batch * self.steps

    def example(self, index: int):
        stage = data_stage(self.options, index // self.global_batch)
        default_kinds: tuple[str, ...] | list[str] = self.options.get("kinds", QUESTION_KINDS)
        default_max_shapes: int = self.options.get("max_shapes", 3)
        kinds = tuple(stage.get("kinds", default_kinds))
        max_shapes = int(stage.get("max_shapes", default_max_shapes))
        return make_example(int(self.options.get("seed", 0)) * 1_000_003 + index, kinds=kinds, max_shapes=max_shapes)

    def __getitem__(self, index: int):
        ex = self.example(index)
        conversation = Conversation(chat_messages(ex.question, ex.answer), [ex.image], f"synthetic example {index}")
        return conversation, [to_rgb(ex.image)]


def synthetic_source(options: dict, *, global_batch: int, steps: int, seed: int = 0) -> SyntheticConversations:
    return SyntheticConversations(options, global_batch, steps)


def data_stage(data_cfg: dict, step: int) -> dict:
    """The curriculum stage in force at optimizer ``step`` ({} once past every stage)."""
    for stage in data_cfg.get("stages", []):
        if "until_step" not in stage:
            raise ValueError(f"data.options.stages: every stage needs 'until_step', got {stage}")
        if step < int(stage["until_step"]):
            return stage
    return {}


def build_demo_model(spec: dict, processor, cfg=None, progress: bool = True, fresh: bool = True) -> VLM:
    """The demo VLM for ``processor``'s tokenizer, with per-component overrides
    (``{"demo": true, "decoder": {"num_key_value_heads": 6}}``); ``"vision_warmup": {...}`` runs
    ``warm_up_vision`` on the fresh model first."""
    spec = dict(spec)
    spec.pop("demo", None)
    warmup = spec.pop("vision_warmup", None)
    tok = processor.tokenizer
    base = demo_model_config(len(tok), processor.image_token_id, tok.pad_token_id,
                             processor.end_of_utterance_token_id)
    model = VLM(base.with_overrides(spec))
    if warmup and fresh:
        warm_up_vision(model, processor, warmup, getattr(cfg, "seed", 0), progress)
    return model


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
    bar = progress_bar(range(steps), disable=not progress, desc="vision warm-up")

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
    return float(loss.detach())




def _build_processor(spec: dict, out_dir: str):
    return build_processor(os.path.join(out_dir, "processor"), **spec.get("build", {}))


sources.register_data("synthetic", synthetic_source)
sources.register_model("demo", build_demo_model)
sources.register_processor("build", _build_processor)
