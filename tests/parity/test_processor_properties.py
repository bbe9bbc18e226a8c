"""Properties of the splitter geometry, checked against real processing and against transformers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from idefics3_kit import SplitterConfig
from idefics3_kit.components.splitter import Idefics3Splitter, plan_tiles
from idefics3_kit.processing.images import to_rgb
from tests.strategies import big_geometries, geometries, image_sizes

pytestmark = pytest.mark.parity


def _noise(height: int, width: int, seed: int):
    """A PIL image: a [1, W, 3] array would be read channels-first (the reference's ambiguity rule)."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@settings(deadline=None, max_examples=40)
@given(size=image_sizes(), geometry=geometries(), splitting=st.booleans())
def test_plan_agrees_with_real_processing(size, geometry, splitting):
    """tiles = rows·cols + 1 (or 1 unsplit), every tile exactly S×S and fully valid, as planned."""
    longest, tile = geometry
    cfg = SplitterConfig(longest_edge=longest, tile_size=tile, do_image_splitting=splitting)
    try:
        plan = plan_tiles(*size, cfg)
    except ValueError as exc:  # a grid side that rounds to 0 px: a clear error, from the splitter too
        assert "too thin to split" in str(exc) and splitting
        with pytest.raises(ValueError, match="too thin to split"):
            Idefics3Splitter(cfg)([[to_rgb(_noise(*size, seed=0))]])
        return
    assert plan.tiles == (plan.rows * plan.cols + 1 if plan.rows * plan.cols else 1)
    if plan.rows:
        assert plan.grid_size == (plan.rows * tile, plan.cols * tile)
    else:
        assert plan.grid_size == (tile, tile)
    out = Idefics3Splitter(cfg)([[to_rgb(_noise(*size, seed=sum(size)))]])
    assert out.pixel_values.shape == (1, plan.tiles, 3, tile, tile)
    assert bool(out.pixel_attention_mask.all())


@settings(deadline=None, max_examples=40)
@given(size=image_sizes(), geometry=geometries(), splitting=st.booleans())
def test_plan_agrees_with_transformers_processing(size, geometry, splitting):
    """Rows, cols and tile count equal what transformers' image processor really produces."""
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    longest, tile = geometry
    hf = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                   do_image_splitting=splitting)
    cfg = SplitterConfig(longest_edge=longest, tile_size=tile, do_image_splitting=splitting)
    try:
        out = hf(_noise(*size, seed=1), return_row_col_info=True, return_tensors="np")
    except ValueError:  # transformers cannot split images so thin that a grid side rounds to 0 px
        with pytest.raises(ValueError, match="too thin to split"):
            plan_tiles(*size, cfg)
        return
    plan = plan_tiles(*size, cfg)
    assert (plan.rows, plan.cols) == (out["rows"][0][0], out["cols"][0][0])
    assert out["pixel_values"].shape[1] == plan.tiles


@settings(deadline=None, max_examples=200)
@given(size=image_sizes(20000), geometry=big_geometries())
@example(size=(249, 1), geometry=(249, 249))  # a grid side of 0 px (found by the search)
def test_geometry_equals_transformers_arithmetic_at_real_scale(size, geometry):
    """Stage 1 (with the 4096 cap) and stage 2 sizes equal transformers' own code, without pixels."""
    from transformers.models.idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

    longest, tile = geometry
    height, width = size
    shape_only = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, height, width))  # no pixel memory
    stage1 = get_resize_output_image_size(shape_only, resolution_max_side=longest)
    hf = Idefics3ImageProcessorPil()
    seen = {}
    hf.resize = lambda image, size, resample=None, **kw: seen.setdefault("stage2", (size.height, size.width))
    hf.resize_for_vision_encoder(np.broadcast_to(shape_only[:, :1, :1], (3, *stage1)), tile)
    if 0 in seen["stage2"]:  # a grid side rounds to 0 px: transformers' resize then fails, ours says why first
        with pytest.raises(ValueError, match="too thin to split"):
            plan_tiles(height, width, SplitterConfig(longest_edge=longest, tile_size=tile))
        return
    plan = plan_tiles(height, width, SplitterConfig(longest_edge=longest, tile_size=tile))
    assert plan.resized == tuple(stage1)
    assert plan.grid_size == seen["stage2"]
