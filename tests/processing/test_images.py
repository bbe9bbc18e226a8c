"""Images in: conversion of every supported image to uint8 RGB, with errors that name the image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefics3_kit.components.splitter import Idefics3Splitter, SplitterConfig
from idefics3_kit.processing.images import to_rgb, to_rgb_batch
from idefics3_kit.ops import preprocess as preprocess_op

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = SplitterConfig(longest_edge=96, tile_size=32)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 128)
    rgba[1, 1] = (10, 20, 30, 255)
    for image in (Image.fromarray(rgba, "RGBA"), rgba):
        out = to_rgb(image)
        assert out[0, 0].tolist() == [227, 127, 127]
        assert out[0, 1].tolist() == [255, 255, 255]
        assert out[1, 1].tolist() == [10, 20, 30]


def test_array_layouts_agree():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = torch.from_numpy(rgb)
    assert torch.equal(to_rgb(rgb), expected)
    assert torch.equal(to_rgb(rgb.transpose(2, 0, 1)), expected)
    assert torch.equal(to_rgb(torch.from_numpy(rgb).permute(2, 0, 1)), expected)
    assert torch.equal(to_rgb(Image.fromarray(rgb)), expected)
    gray = rgb[:, :, 0]
    assert torch.equal(to_rgb(gray), torch.from_numpy(np.repeat(gray[:, :, None], 3, 2)))
    assert torch.equal(to_rgb(gray[None]), to_rgb(gray))


def test_float_arrays_are_rescaled_once():
    rgb = np.random.default_rng(1).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    assert torch.equal(to_rgb(rgb.astype(np.float32) / 255), torch.from_numpy(rgb))
    assert torch.equal(to_rgb(torch.from_numpy(rgb).double() / 255), torch.from_numpy(rgb))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        to_rgb(rgb.astype(np.float32))


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    expected = [0, 1, 128, 255]
    assert to_rgb(values)[0, :, 0].tolist() == expected
    assert to_rgb(Image.fromarray(values))[0, :, 1].tolist() == expected  # mode I;16
    with pytest.raises(ValueError, match="mode 'F'"):
        to_rgb(Image.fromarray(values.astype(np.float32)))


def test_real_photos_load_from_files_and_bytes():
    cat = to_rgb(DATA / "chelsea.png")
    assert tuple(cat.shape) == (300, 451, 3)
    camera = to_rgb((DATA / "camera.png").read_bytes())
    assert tuple(camera.shape) == (512, 512, 3) and torch.equal(camera[..., 0], camera[..., 2])


@pytest.mark.parametrize("image,match", [
    (np.zeros((0, 5, 3), np.uint8), "empty"),
    (np.zeros((4, 0), np.uint8), "empty"),
    (Image.new("RGB", (0, 3)), "empty"),
    (np.zeros((5, 6, 2), np.uint8), "channel axis"),
    (np.zeros((4, 5, 3), np.int32), "dtype"),
    (np.zeros((2, 3, 4, 5), np.uint8), "2 or 3 dimensions"),
    (b"not an image at all", "cannot decode"),
    ("/nonexistent/cat.png", "not found: /nonexistent/cat.png"),
    (42, "unsupported image type int"),
])
def test_bad_images_are_named(image, match):
    with pytest.raises(ValueError, match=match) as info:
        to_rgb(image, where="image 3 (sample 1, position 0)")
    assert "image 3" in str(info.value)


def test_truncated_file_is_named(tmp_path):
    data = (DATA / "chelsea.png").read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.png"):
        to_rgb(broken)


def test_pixel_limit(monkeypatch):
    big = np.zeros((100, 101, 3), np.uint8)
    with pytest.raises(ValueError, match="over the limit of 10000"):
        to_rgb(big, max_pixels=10000)
    with pytest.raises(ValueError, match="10100 pixels"):
        to_rgb_batch([[big]], SMALL.replace(max_pixels=10000).pixel_limit())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # Pillow's own limit is followed by default
    with pytest.raises(ValueError, match="limit of 5000"):
        to_rgb_batch([[big]], SMALL.pixel_limit())
    rgb = to_rgb_batch([[big]], SMALL.replace(max_pixels=0).pixel_limit())
    assert Idefics3Splitter(SMALL)(rgb).pixel_values.shape[1] == 10


def test_nothing_is_processed_when_a_later_image_is_bad(monkeypatch):
    calls = []
    monkeypatch.setattr(preprocess_op, "preprocess_into", lambda *a, **k: calls.append(a))
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="image 2 "):
        to_rgb_batch([[good], [good, b"corrupt"]])
    assert calls == []


def test_transparency_in_memory_vs_from_files():
    """PIL images get alpha over white; encoded files drop alpha like transformers' load_image."""
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=1)
    assert to_rgb(image)[0, 0].tolist() == [255, 255, 255]
    assert to_rgb(buffer.getvalue())[0, 0].tolist() == [255, 0, 0]


def test_files_are_turned_upright_by_exif(tmp_path):
    image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))  # 3 wide, 2 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image.save(tmp_path / "rotated.png", exif=exif)
    assert tuple(to_rgb(tmp_path / "rotated.png").shape) == (3, 2, 3)


def test_base64_and_urls():
    import base64

    encoded = base64.b64encode((DATA / "chelsea.png").read_bytes()).decode()
    assert torch.equal(to_rgb(encoded), to_rgb(f"data:image/png;base64,{encoded}"))
    with pytest.raises(ValueError, match="URLs are not downloaded"):
        to_rgb("https://example.com/cat.png")
