"""The idefics3 splitter: RGB conversion, geometry, tiles and its errors (no transformers needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from idefics3_kit import registry
from idefics3_kit.components.splitter import Idefics3Splitter, SplitterConfig, plan_tiles
from idefics3_kit.processing.images import to_rgb
from idefics3_kit.ops import preprocess as preprocess_op

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = SplitterConfig(longest_edge=96, tile_size=32)


def test_registered_and_buildable_from_default_config():
    splitter = registry.create("splitter", "idefics3")
    assert isinstance(splitter, Idefics3Splitter)
    assert splitter.config == SplitterConfig()
    assert (splitter.config.longest_edge, splitter.tile_size) == (2048, 512)  # SmolVLM-256M
    small = registry.create("splitter", "idefics3", {"longest_edge": 96, "tile_size": 32})
    assert small.config == SMALL


@pytest.mark.parametrize("field,value", [("tile_size", 0), ("longest_edge", -1), ("image_std", (1, 0, 1)),
                                         ("image_mean", (0.5, 0.5)), ("max_pixels", -5)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SplitterConfig.{field}"):
        SplitterConfig(**{field: value})


def test_hf_config_round_trip():
    cfg = SplitterConfig(longest_edge=1536, tile_size=384, do_image_splitting=False)
    assert SplitterConfig.from_hf(cfg.to_hf()) == cfg
    assert SplitterConfig.from_hf({}) == SplitterConfig(longest_edge=1456, tile_size=364)  # reference defaults
    with pytest.raises(ValueError, match="resample"):
        SplitterConfig.from_hf({"resample": 3})


@pytest.mark.parametrize("hw,stage1,stage2,grid", [
    ((900, 1600), (820, 1456), (1092, 1456), (3, 4)),
    ((1600, 900), (1456, 820), (1456, 1092), (4, 3)),
    ((100, 2000), (72, 1456), (364, 1456), (1, 4)),
    ((3, 10), (436, 1456), (728, 1456), (2, 4)),
    ((20000, 500), (1456, 36), (1456, 364), (4, 1)),
    ((10000, 1), (1456, 1), (1456, 364), (4, 1)),
    ((1, 1), (1456, 1456), (1456, 1456), (4, 4)),
])
def test_geometry_of_the_reference_examples(hw, stage1, stage2, grid):
    p = plan_tiles(*hw, SplitterConfig(longest_edge=1456, tile_size=364))
    assert (p.resized, p.grid_size, (p.rows, p.cols), p.tiles) == (stage1, stage2, grid, grid[0] * grid[1] + 1)


def test_geometry_cap_and_unsplit():
    p = plan_tiles(100, 100, SplitterConfig(longest_edge=5000, tile_size=1000))
    assert p.resized == (4096, 4096) and (p.rows, p.cols) == (5, 5)
    single = plan_tiles(100, 50, SplitterConfig(longest_edge=32, tile_size=32))
    assert (single.rows, single.cols, single.tiles, single.grid_size) == (0, 0, 1, (32, 32))
    off = plan_tiles(900, 1600, SplitterConfig(do_image_splitting=False))
    assert (off.rows, off.cols, off.tiles, off.grid_size) == (0, 0, 1, (512, 512))


def test_real_splitting_where_transformers_helper_is_wrong():
    """Reference §1.11: L=1000, T=364, 1044×1487 (H×W) really gives 3×3, the helper says 2×3."""
    cfg = SplitterConfig(longest_edge=1000, tile_size=364)
    p = plan_tiles(1044, 1487, cfg)
    assert (p.rows, p.cols, p.tiles) == (3, 3, 10)


def test_splitter_takes_only_uint8_rgb_tensors():
    with pytest.raises(ValueError, match=r"image \(sample 0, position 0\): the splitter takes uint8 RGB tensors"):
        Idefics3Splitter(SMALL)([[np.zeros((8, 8, 3), np.uint8)]])
    with pytest.raises(ValueError, match="a torch.float32 tensor of shape"):
        Idefics3Splitter(SMALL)([[torch.zeros(8, 8, 3)]])


def test_batch_layout_padding_tiles_and_order():
    """Tiles are row-major with the global tile last; padding tiles are all zero with a zero mask."""
    splitter = Idefics3Splitter(SMALL)
    image = np.random.default_rng(2).integers(0, 256, (30, 60, 3), dtype=np.uint8)  # -> 48×96 -> 64×96: 2×3
    rgb = to_rgb(image)
    out = splitter([[rgb], [], [rgb, rgb]])
    assert [[(p.rows, p.cols) for p in sample] for sample in out.plans] == [[(2, 3)], [], [(2, 3), (2, 3)]]
    assert out.pixel_values.shape == (3, 14, 3, 32, 32) and out.pixel_attention_mask.dtype == torch.int64
    assert out.pixel_attention_mask.sum(dim=(2, 3)).tolist() == [[1024] * 7 + [0] * 7, [0] * 14, [1024] * 14]
    assert out.pixel_values[0, 7:].abs().sum() == 0 and out.pixel_values[1].abs().sum() == 0
    assert torch.equal(out.pixel_values[2, :7], out.pixel_values[0, :7])
    stage2 = preprocess_op.resize_u8(preprocess_op.resize_u8(torch.from_numpy(image), 48, 96), 64, 96)
    lut = preprocess_op.normalize_lut((0.5,) * 3, (0.5,) * 3, 1 / 255)
    tile_1_2 = stage2[32:64, 32:64].permute(2, 0, 1).long()  # row 1, col 1 (0-based) -> tile index 4
    assert torch.equal(out.pixel_values[0, 4], torch.stack([lut[c][tile_1_2[c]] for c in range(3)]))


def test_bf16_output_and_overrides():
    image = np.full((10, 10, 3), 200, np.uint8)
    out = Idefics3Splitter(SMALL)([[to_rgb(image)]], dtype=torch.bfloat16, do_image_splitting=False)
    assert out.pixel_values.dtype == torch.bfloat16 and out.pixel_values.shape == (1, 1, 3, 32, 32)
    assert Idefics3Splitter(SMALL).plan(10, 10, tile_size=16).tiles == 37


def test_plan_uses_height_then_width():
    p = Idefics3Splitter(SplitterConfig(longest_edge=1456, tile_size=364)).plan(900, 1600)
    assert (p.rows, p.cols) == (3, 4)


def test_images_too_thin_to_split_get_a_clear_error():
    # 49x1 at longest_edge 49 / tile 49: the grid would be 0 px wide (transformers' processor
    # fails on it as well, with a message about its size dictionary)
    from idefics3_kit.components.splitter import SplitterConfig, plan_tiles

    cfg = SplitterConfig(longest_edge=49, tile_size=49)
    with pytest.raises(ValueError, match=r"49x1 \(height x width\) is too thin to split.*do_image_splitting=False"):
        plan_tiles(49, 1, cfg)
    assert plan_tiles(49, 1, SplitterConfig(longest_edge=49, tile_size=49, do_image_splitting=False)).tiles == 1
