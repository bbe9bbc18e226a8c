"""The README's main job.

By default it loads the small trained model shipped inside the package, asks it about a
bundled example image and about a freshly generated one, prints the answers and writes a
picture of how the image was split into tiles. ``--preset NAME`` instead builds a preset with
random weights and shows the component tree, parameter counts, image tokens and the
predicted next tokens (what the demo did before a trained model shipped).
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from ...config import VLMConfig
from ...model import VLM
from ...processing import Processor
from ...processing.images import open_image, to_rgb
from ...processing.picture import draw_plan, save_picture
from .model import answer, shipped_model_dir
from .synthetic import COLOURS, IMAGE_SIZES, _Shape, _draw_shape


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A gradient with a filled circle: uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    (7 * (x + y)) % 256], axis=-1).astype(np.uint8)
    rng = np.random.default_rng(seed)
    cy, cx, r = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), min(height, width) // 5
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = (220, 30, 30)
    return img


def component_tree(model: VLM) -> str:
    counts = model.parameter_counts()
    lines = [f"VLM ({counts['total']:,} parameters)"]
    for kind in ("vision", "connector", "decoder"):
        module = getattr(model, kind)
        lines.append(f"  {kind:9s} {getattr(module, 'component_name', '?'):14s} "
                     f"{type(module).__name__:24s} {counts[kind]:>12,} parameters")
    return "\n".join(lines)


def run_random(preset: str = "tiny", seed: int = 0) -> int:
    torch.manual_seed(seed)
    cfg = VLMConfig.preset(preset)
    model = VLM(cfg).eval()
    print(component_tree(model))
    tile = cfg.vision.image_size
    image = synthetic_image(2 * tile, 3 * tile, seed)
    # 2x3 tiles + the global tile, as the idefics3 splitter cuts a 2:3 image of tile multiples
    tiles = [image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(2) for c in range(3)]
    tiles.append(image[::2, ::3][:tile, :tile])
    pixels = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)[None]
    n_image_tokens = len(tiles) * cfg.image_seq_len
    prompt = torch.randint(3, cfg.decoder.vocab_size, (1, 8))
    ids = torch.cat([prompt[:, :4], torch.full((1, n_image_tokens), cfg.image_token_id), prompt[:, 4:]], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels)
    top = out.logits[0, -1].topk(5)
    print(f"image: {image.shape[1]}x{image.shape[0]} px -> {len(tiles)} tiles x {cfg.image_seq_len} tokens "
          f"= {n_image_tokens} image tokens; sequence length {ids.shape[1]}")
    print("predicted next tokens (random weights):",
          ", ".join(f"{int(i)} ({float(p):.3f})" for i, p in zip(top.indices, top.values.softmax(-1))))
    return 0


# ---- the trained demo model ----------------------------------------------------------------------

def example_image_path() -> str:
    """The bundled example, 160x128 px: a red circle in the top-left quarter and a blue square
    in the bottom-right one (drawn with synthetic.py's shapes)."""
    return os.path.join(os.path.dirname(__file__), "assets", "example.png")


def fresh_example(seed: int):
    """A newly drawn image with a circle of a random colour, and the question about it."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = rng.choice(IMAGE_SIZES)  # near-square, like the training images
    image = Image.new("RGB", (width, height), (245, 245, 240))
    colour = rng.choice(sorted(COLOURS))
    size = int(min(width, height) / 2 * 0.75)  # inside one quarter, like the training shapes
    x0 = rng.choice((0, width // 2)) + rng.randint(0, width // 2 - size)
    y0 = rng.choice((0, height // 2)) + rng.randint(0, height // 2 - size)
    _draw_shape(ImageDraw.Draw(image), _Shape("circle", colour, (x0, y0, x0 + size, y0 + size)))
    return image, "What colour is the circle?", colour


def run(model_dir: str | None = None, preset: str | None = None, seed: int | None = None,
        split_picture: str = "demo_split.png") -> int:

    if preset is not None:
        return run_random(preset, seed or 0)
    if model_dir is None and not os.path.exists(os.path.join(shipped_model_dir(), "config.json")):
        print("(no trained demo model is shipped in this build yet: showing the tiny preset with random weights)")
        return run_random("tiny", seed or 0)
    model_dir = model_dir or shipped_model_dir()
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no checkpoint (config.json) in {model_dir}")
    model = VLM.from_pretrained(model_dir).eval()
    processor = Processor.from_pretrained(model_dir)
    print(component_tree(model))
    seed = int(time.time()) if seed is None else seed
    bundled = open_image(example_image_path(), "the bundled example image", None).convert("RGB")
    fresh, fresh_question, fresh_truth = fresh_example(seed)
    questions = [("example.png", bundled, "What colour is the circle?", None),
                 ("example.png", bundled, "How many shapes are there?", None),
                 ("example.png", bundled, "Is the square on the left or the right?", None),
                 (f"fresh image (seed {seed})", fresh, fresh_question, fresh_truth)]
    answers = answer(model, processor, [q[1] for q in questions], [q[2] for q in questions])
    for (name, image, question, truth), reply in zip(questions, answers):
        plan = processor.plan(image)
        check = "" if truth is None else f"   (drawn: {truth}{', correct' if reply == truth else ''})"
        print(f"{name} {image.width}x{image.height}, {plan.rows}x{plan.cols} tiles + global = {plan.tiles} tiles, "
              f"{plan.image_tokens} image tokens")
        print(f"  Q: {question}\n  A: {reply}{check}")
    rgb = to_rgb(fresh)
    picture = draw_plan(rgb, processor.splitter.plan(rgb.shape[0], rgb.shape[1]), processor.image_seq_len)
    save_picture(picture, split_picture)
    print(f"tile split of the fresh image: {split_picture}")
    return 0
