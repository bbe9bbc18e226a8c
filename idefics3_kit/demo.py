"""The README's main job until a trained model ships: build the tiny preset, run one image."""

from __future__ import annotations

import numpy as np
import torch

from .config import VLMConfig
from .model import VLM


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
    counts = model.num_parameters()
    lines = [f"VLM ({counts['total']:,} parameters)"]
    for kind in ("vision", "connector", "decoder"):
        module = getattr(model, kind)
        lines.append(f"  {kind:9s} {getattr(module, 'component_name', '?'):14s} "
                     f"{type(module).__name__:24s} {counts[kind]:>12,} parameters")
    return "\n".join(lines)


def run(preset: str = "tiny", seed: int = 0) -> int:
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
