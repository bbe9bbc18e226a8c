"""transformers' Idefics3 resize geometry from plain ints (test and benchmark helper).

Mirrors Idefics3ImageProcessorPil: stage 1 scales the longest edge to ``longest_edge`` (short
side truncated, then rounded up to even), stage 2 rounds both sides up to tile multiples
(aspect-derived), then rows x cols tiles plus a global tile, or one tile when stage 2 is a
single tile.
"""

from __future__ import annotations

import math

MAX_IMAGE_SIZE = 4096


def stage1(h: int, w: int, longest_edge: int) -> tuple[int, int]:
    ar = w / h
    if w >= h:
        w, h = longest_edge, int(longest_edge / ar)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * ar)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    ar = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ar)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ar)
    return max(h, 1), max(w, 1)


def stage2(h: int, w: int, tile: int) -> tuple[int, int]:
    ar = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / ar) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * ar) / tile) * tile
    return h, w


def image_geometry(h: int, w: int, longest_edge: int, tile: int, sample: int = 0, first: int = 0) -> list[int]:
    """The 8 ints preprocess_into takes for one image: (sample, first, h1, w1, h2, w2, rows, cols)."""
    h1, w1 = stage1(h, w, longest_edge)
    h2, w2 = stage2(h1, w1, tile)
    rows, cols = (h2 // tile, w2 // tile) if (h2 > tile or w2 > tile) else (0, 0)
    return [sample, first, h1, w1, h2, w2, rows, cols]


def num_tiles(geometry: list[int]) -> int:
    rows, cols = geometry[6], geometry[7]
    return rows * cols + 1 if rows * cols else 1
