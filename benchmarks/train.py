"""Training throughput: our Trainer vs the loop a transformers + peft user writes, side by side.

    python benchmarks/train.py [--steps 6] [--batch 4] [--rounds 2] [--threads 2]

One process, CPU, bf16 autocast, SmolVLM-256M shapes with random weights (the shipped demo's
tokenizer: its ids fit the 49280-word vocabulary; one 512-px tile per image, 64 image tokens), LoRA
r=16 on the decoder's seven projections in both. The data is the test photographs with written
questions and answers (tests/train/photos.py), single- and multi-turn, the same conversations in
the same order for both legs; each leg processes its own batches in the step (ours: our processor;
theirs: transformers' Idefics3Processor), as each library's user would. Tokens/s counts the real
(unpadded) tokens of each step, data preparation included. Then the padded-token fraction of our
batches with and without length grouping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import idefics3_kit as ik  # noqa: E402
import idefics3_kit.recipes.demo  # noqa: E402,F401
from idefics3_kit.recipes.demo.model import shipped_model_dir  # noqa: E402
from idefics3_kit.train import Trainer, metrics  # noqa: E402
from tests.train.photos import records, write_jsonl  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_checkpoint(folder: Path) -> Path:
    """A random SmolVLM-256M-shaped model and a processor that fits it, saved for both libraries."""
    proc = ik.Processor.from_pretrained(shipped_model_dir(), image_seq_len=64, longest_edge=512, tile_size=512,
                                        do_image_splitting=False)
    cfg = ik.VLMConfig.preset("smolvlm-256m", image_token_id=proc.image_token_id)
    torch.manual_seed(0)
    ik.VLM(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def conversations(n: int) -> list[dict]:
    rows = records()
    long = [{"messages": r["messages"][:1] + [{"role": "assistant", "content": [
        {"type": "text", "text": " ".join([r["messages"][1]["content"][0]["text"]] * 6)}]}], "images": r["images"]}
        for r in rows[::3]]
    pool = rows + long
    return [pool[i % len(pool)] for i in range(n)]


def ours(ckpt: Path, data: Path, out: Path, steps: int, batch: int, group: bool = False) -> dict:
    cfg = {"out_dir": str(out), "model": {"init": str(ckpt)}, "data": {"source": str(data), "num_workers": 0,
                                                                     "group_by_length": group, "shuffle": False},
           "steps": steps, "batch_size": batch, "lr": 1e-4, "warmup_steps": 0, "save_every": 10 ** 6, "bf16": True,
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS, "components": ["decoder"]},
           "freeze": ["vision", "connector"], "seed": 0}
    trainer = Trainer(config=cfg, progress=False)
    trainer.export = lambda *a, **k: None  # the timing is about the steps, not the final export
    trainer.fit()
    rows = metrics.read(str(out))
    return {"tokens_per_s": [r["tokens_per_s"] for r in rows][1:],  # the first step warms up
            "padded_fraction": statistics.mean(r["padded_fraction"] for r in rows)}


def theirs(ckpt: Path, data: Path, steps: int, batch: int) -> dict:
    """The loop a transformers + peft user writes: their processor, their model, peft, AdamW."""
    import peft
    from transformers import Idefics3ForConditionalGeneration, Idefics3Processor
    from PIL import Image

    processor = Idefics3Processor.from_pretrained(ckpt)
    model = Idefics3ForConditionalGeneration.from_pretrained(ckpt)
    targets = rf"model\.text_model\..*\.(?:{'|'.join(TARGETS)})"
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=targets)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    speeds = []
    for step in range(steps):
        start = time.perf_counter()
        chunk = rows[step * batch:(step + 1) * batch]
        texts = [processor.apply_chat_template(r["messages"]) for r in chunk]
        images = [[Image.open(data.parent / name).convert("RGB") for name in r["images"]] for r in chunk]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        labels[labels == image_token] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        speeds.append(int(inputs["attention_mask"].sum()) / (time.perf_counter() - start))
    return {"tokens_per_s": speeds[1:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    ckpt = make_checkpoint(tmp / "ckpt")
    data = write_jsonl(tmp / "data", rows=conversations(args.steps * args.batch))
    print(f"SmolVLM-256M shapes, random weights, LoRA r=16 on the decoder, bf16 autocast, {args.threads} threads, "
          f"batch {args.batch}, {args.steps} steps (the first not timed), torch {torch.__version__}")
    legs: dict[str, list] = {"ours": [], "transformers + peft": []}
    for r in range(args.rounds):
        legs["ours"] += ours(ckpt, data, tmp / f"ours{r}", args.steps, args.batch)["tokens_per_s"]
        legs["transformers + peft"] += theirs(ckpt, data, args.steps, args.batch)["tokens_per_s"]
    med = {k: statistics.median(v) for k, v in legs.items()}
    for name, value in med.items():
        print(f"  {name:22s} {value:8.1f} tokens/s (median of {len(legs[name])} steps)")
    print(f"  ratio ours / transformers + peft: x{med['ours'] / med['transformers + peft']:.2f} (target >= 1)")
    plain = ours(ckpt, data, tmp / "plain", args.steps, args.batch, group=False)["padded_fraction"]
    grouped = ours(ckpt, data, tmp / "grouped", args.steps, args.batch, group=True)["padded_fraction"]
    print(f"padded-token fraction of our batches: {plain:.3f} in data order, {grouped:.3f} grouped by length")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
