"""Idefics3 resize/split geometry (reference §1.3-1.5) for the CUDA preprocessing tests.

Kept local to tests/cuda so these tests do not depend on the splitter component.
"""

from __future__ import annotations

import math


def idefics3_geometry(h: int, w: int, longest: int = 1456, tile: int = 364):
    """(h1, w1, h2, w2, rows, cols) for an input of h x w."""
    ar = w / h
    if w >= h:
        w1 = longest
        h1 = int(longest / ar)
        if h1 % 2:
            h1 += 1
    else:
        h1 = longest
        w1 = int(longest * ar)
        if w1 % 2:
            w1 += 1
    h1, w1 = max(h1, 1), max(w1, 1)
    ar = w1 / h1
    if w1 >= h1:
        w2 = math.ceil(w1 / tile) * tile
        h2 = int(w2 / ar)
        h2 = math.ceil(h2 / tile) * tile
    else:
        h2 = math.ceil(h1 / tile) * tile
        w2 = int(h2 * ar)
        w2 = math.ceil(w2 / tile) * tile
    if h2 > tile or w2 > tile:
        return h1, w1, h2, w2, h2 // tile, w2 // tile
    return h1, w1, tile, tile, 0, 0


def batch_geometry(sizes_per_sample, longest: int = 1456, tile: int = 364):
    """Geometry list (8 ints per image) and the max tiles per sample for a nested batch of sizes."""
    geometry, max_tiles = [], 1
    for sample, sizes in enumerate(sizes_per_sample):
        first = 0
        for h, w in sizes:
            h1, w1, h2, w2, rows, cols = idefics3_geometry(h, w, longest, tile)
            geometry += [sample, first, h1, w1, h2, w2, rows, cols]
            first += rows * cols + 1 if rows * cols else 1
        max_tiles = max(max_tiles, first)
    return geometry, max_tiles
