"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

from hypothesis import strategies as st


def image_sizes(max_side: int = 150):
    """(height, width) of an image, including extreme aspect ratios and 1-pixel sides."""
    side = st.integers(1, max_side)
    return st.tuples(side, side)


@st.composite
def geometries(draw, max_tile: int = 64, max_longest: int = 128, min_tile: int = 8):
    """(longest_edge, tile_size): any pair, longest_edge not necessarily a multiple of the tile."""
    tile = draw(st.integers(min_tile, max_tile))
    longest = draw(st.integers(2, max_longest))
    return longest, tile


@st.composite
def big_geometries(draw):
    """Real-scale settings, up to and beyond the 4096 cap (arithmetic only, no pixels)."""
    tile = draw(st.sampled_from([364, 384, 512]) | st.integers(16, 1024))
    longest = draw(st.sampled_from([1456, 1536, 2048, 1000, 4096, 5000]) | st.integers(16, 6000))
    return longest, tile
