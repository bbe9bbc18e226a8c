"""Fused preprocessing vs transformers' Idefics3ImageProcessorPil (SmolVLM-256M geometry).

    python benchmarks/preprocess.py

Both legs start from the same PIL image and end with pixel_values (float32) + the pixel mask;
the outputs are checked bit-equal first. 2 threads (--threads N to change), legs interleaved, medians.
"""

from __future__ import annotations

import os
import sys

# numpy's OpenBLAS keeps idle worker threads spinning after calls; on a 2-core machine they
# steal the cores from whichever leg runs next. Elementwise numpy (all the transformers
# processor does) is single-threaded anyway, so this costs that leg nothing.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ops"))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _geometry import image_geometry, num_tiles  # noqa: E402
from _timing import compare, set_threads_from_argv  # noqa: E402

from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops import preprocess as P  # noqa: E402

LONGEST, TILE = 2048, 512  # SmolVLM-256M
MEAN, STD, RESCALE = [0.5] * 3, [0.5] * 3, 1 / 255


def photo_like(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1)
    return Image.fromarray((base + rng.integers(-20, 20, (h, w, 3))).clip(0, 255).astype(np.uint8))


def ours(img: Image.Image):
    arr = torch.from_numpy(np.array(img))  # [H, W, 3] uint8
    g = image_geometry(arr.shape[0], arr.shape[1], LONGEST, TILE)
    n = num_tiles(g)
    # allocated as the splitter does (ops.empty_pooled); every tile is written: no padding to zero
    pv = ops.empty_pooled((1, n, 3, TILE, TILE), torch.float32)
    pm = ops.empty_pooled((1, n, TILE, TILE), torch.int64)
    P.preprocess_into([arr], pv, pm, g, MEAN, STD, RESCALE)
    return pv, pm


def main() -> None:
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    set_threads_from_argv()
    print(f"backend: {ops.backend()}   threads: {torch.get_num_threads()}   load avg: {os.getloadavg()[0]:.1f} (other processes skew 2-thread timings)")
    hf = Idefics3ImageProcessorPil(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE})
    for w, h in [(1600, 900), (640, 480)]:
        img = photo_like(w, h)
        ref = hf(images=[[img]], return_tensors="pt")
        pv, pm = ours(img)
        equal = torch.equal(pv, ref["pixel_values"]) and torch.equal(pm, ref["pixel_attention_mask"])
        t = compare({"transformers": lambda: hf(images=[[img]], return_tensors="pt"), "ours": lambda: ours(img)})
        print(f"{w}x{h} -> {tuple(pv.shape)}  bit-equal: {equal}  transformers {t['transformers'] * 1e3:7.1f} ms  "
              f"ours {t['ours'] * 1e3:6.1f} ms  speedup x{t['transformers'] / t['ours']:.1f}")


if __name__ == "__main__":
    main()
