"""Preprocessing ops: the compiled resize/preprocess against Pillow, the reference and transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idefics3_kit import ops
from idefics3_kit.ops import preprocess as P

from _geometry import image_geometry, num_tiles

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")
MEAN, STD, RESCALE = [0.5] * 3, [0.5] * 3, 1 / 255


def _image(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth structure plus noise: exercises both flat regions and clipping at 0 / 255.
    y, x = np.mgrid[0:h, 0:w]
    base = (x * 255 // max(w - 1, 1) + y * 3)[..., None] + np.arange(c) * 40
    img = (base + rng.integers(-60, 60, (h, w, c))).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(img)


def _compiled_resize(img, oh, ow):
    return torch.ops.idefics3_kit.resize_u8(img, oh, ow)


# ---- reference (always run) -------------------------------------------------------------------

def test_normalize_lut_matches_transformers_arithmetic():
    lut = P.normalize_lut(MEAN, STD, RESCALE)
    u = np.arange(256, dtype=np.uint8)
    expected = ((u.astype(np.float64) * RESCALE).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(lut[0].numpy(), expected.astype(np.float32))


def test_resize_ref_same_size_is_copy():
    img = _image(5, 7)
    out = P.resize_u8_ref(img, 5, 7)
    assert torch.equal(out, img) and out.data_ptr() != img.data_ptr()


def test_preprocess_ref_matches_transformers():
    pytest.importorskip("transformers")
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    hf = Idefics3ImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    img = _image(37, 61)
    ref = hf(images=[[Image.fromarray(img.numpy())]], return_tensors="pt")
    g = image_geometry(37, 61, 96, 32)
    pv = torch.zeros(1, num_tiles(g), 3, 32, 32)
    pm = torch.zeros(1, num_tiles(g), 32, 32, dtype=torch.int64)
    P.preprocess_into_ref([img], pv, pm, g, MEAN, STD, RESCALE)
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(pm, ref["pixel_attention_mask"])


# ---- compiled vs Pillow -----------------------------------------------------------------------

sizes = st.integers(1, 300)


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=sizes, w=sizes, oh=sizes, ow=sizes, c=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_resize_matches_pillow(h, w, oh, ow, c, seed):
    img = _image(h, w, c, seed)
    assert torch.equal(_compiled_resize(img, oh, ow), P.resize_u8_ref(img, oh, ow))


@needs_ext
@pytest.mark.parametrize("h,w,oh,ow", [
    (900, 1600, 1152, 2048), (1152, 2048, 1536, 2048), (1536, 2048, 512, 512),  # the SmolVLM chain
    (4000, 3, 17, 4000), (2, 4000, 4000, 1), (1, 1, 4000, 3), (4000, 4000, 7, 5),  # extremes
    (3000, 40, 2048, 28), (480, 640, 1536, 2048),
])
def test_resize_matches_pillow_large(h, w, oh, ow):
    img = _image(h, w, 3, seed=h + w)
    assert torch.equal(_compiled_resize(img, oh, ow), P.resize_u8_ref(img, oh, ow))


@needs_ext
def test_resize_same_size_and_gray():
    img = _image(31, 17, 1)
    out = _compiled_resize(img, 31, 17)
    assert torch.equal(out, img) and out.data_ptr() != img.data_ptr()
    assert torch.equal(_compiled_resize(img, 9, 40), P.resize_u8_ref(img, 9, 40))


# ---- compiled preprocess_into ----------------------------------------------------------------

def _batch(images, longest_edge, tile, dtype):
    geometry, counts = [], [0] * len(images)
    for i, (sample, img) in enumerate(images):
        g = image_geometry(img.shape[0], img.shape[1], longest_edge, tile, sample, counts[sample])
        counts[sample] += num_tiles(g)
        geometry += g
    n = max(counts) + 1  # one padding tile too
    pv = torch.zeros(len(counts), n, 3, tile, tile, dtype=dtype)
    pm = torch.zeros(len(counts), n, tile, tile, dtype=torch.int64)
    return [img for _, img in images], pv, pm, geometry


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preprocess_matches_reference(dtype):
    images = [(0, _image(40, 70, seed=1)), (0, _image(16, 16, seed=2)), (1, _image(90, 20, seed=3))]
    imgs, pv, pm, geometry = _batch(images, 64, 16, dtype)
    ref_pv, ref_pm = pv.clone(), pm.clone()
    P.preprocess_into_ref(imgs, ref_pv, ref_pm, geometry, MEAN, STD, RESCALE)
    torch.ops.idefics3_kit.preprocess_into(imgs, pv, pm, geometry, MEAN, STD, RESCALE)
    assert torch.equal(pv, ref_pv) and torch.equal(pm, ref_pm)


@needs_ext
def test_preprocess_unsplit_tile():
    img = _image(16, 16)
    g = [0, 0, 16, 16, 16, 16, 0, 0]  # already one tile: no resize, no global tile
    pv, pm = torch.zeros(1, 1, 3, 16, 16), torch.zeros(1, 1, 16, 16, dtype=torch.int64)
    ref_pv, ref_pm = pv.clone(), pm.clone()
    P.preprocess_into_ref([img], ref_pv, ref_pm, g, MEAN, STD, RESCALE)
    P.preprocess_into([img], pv, pm, g, MEAN, STD, RESCALE)
    assert torch.equal(pv, ref_pv) and torch.equal(pm, ref_pm)


@needs_ext
@pytest.mark.parity
@pytest.mark.parametrize("wh", [(1600, 900), (300, 700)])
def test_preprocess_bit_exact_vs_transformers_smolvlm_256m(wh):
    pytest.importorskip("transformers")
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    w, h = wh
    img = _image(h, w, seed=w)
    hf = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    ref = hf(images=[[Image.fromarray(img.numpy())]], return_tensors="pt")
    g = image_geometry(h, w, 2048, 512)
    pv = torch.zeros(1, num_tiles(g), 3, 512, 512)
    pm = torch.zeros(1, num_tiles(g), 512, 512, dtype=torch.int64)
    P.preprocess_into([img], pv, pm, g, MEAN, STD, RESCALE)
    assert pv.shape == ref["pixel_values"].shape
    assert torch.equal(pv, ref["pixel_values"]) and torch.equal(pm, ref["pixel_attention_mask"])


@needs_ext
def test_opcheck_preprocess_ops():
    img = _image(20, 30)
    torch.library.opcheck(torch.ops.idefics3_kit.resize_u8.default, (img, 11, 45))
    imgs, pv, pm, geometry = _batch([(0, img)], 32, 16, torch.float32)
    torch.library.opcheck(torch.ops.idefics3_kit.preprocess_into.default,
                          (imgs, pv, pm, geometry, MEAN, STD, RESCALE))


# ---- argument checks: clear errors, never a crash -------------------------------------------

@needs_ext
@pytest.mark.parametrize("make,match", [
    (lambda: (torch.zeros(4, 4, 3, dtype=torch.float32), 2, 2), "image must be Byte"),
    (lambda: (torch.zeros(4, 4, dtype=torch.uint8), 2, 2), "image must be 3-D"),
    (lambda: (torch.zeros(4, 4, 2, dtype=torch.uint8), 2, 2), "1 or 3 channels"),
    (lambda: (torch.zeros(4, 6, 3, dtype=torch.uint8)[:, ::2], 2, 2), "image must be contiguous"),
    (lambda: (torch.zeros(4, 4, 3, dtype=torch.uint8), 0, 2), "output size must be in"),
    (lambda: (torch.zeros(4, 4, 3, dtype=torch.uint8), 2, 1 << 20), "output size must be in"),
    (lambda: (torch.zeros(0, 4, 3, dtype=torch.uint8), 2, 2), "image size must be in"),
])
def test_resize_bad_arguments(make, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.idefics3_kit.resize_u8(*make())


@needs_ext
def test_preprocess_bad_arguments():
    img = _image(20, 30)
    imgs, pv, pm, g = _batch([(0, img)], 32, 16, torch.float32)
    op = torch.ops.idefics3_kit.preprocess_into
    with pytest.raises(RuntimeError, match="pixel_values must be float32 or bfloat16"):
        op(imgs, pv.half(), pm, g, MEAN, STD, RESCALE)
    with pytest.raises(RuntimeError, match="pixel_mask must be"):
        op(imgs, pv, pm[:, :1], g, MEAN, STD, RESCALE)
    with pytest.raises(RuntimeError, match="geometry needs 8 ints per image"):
        op(imgs, pv, pm, g[:7], MEAN, STD, RESCALE)
    bad = list(g)
    bad[1] = 5  # first tile beyond pixel_values
    with pytest.raises(RuntimeError, match="outside pixel_values"):
        op(imgs, pv, pm, bad, MEAN, STD, RESCALE)
    bad = list(g)
    bad[4] = 17  # stage 2 height not rows * S
    with pytest.raises(RuntimeError, match="is not"):
        op(imgs, pv, pm, bad, MEAN, STD, RESCALE)
    with pytest.raises(RuntimeError, match=r"images\[0\] must be Byte"):
        op([img.float()], pv, pm, g, MEAN, STD, RESCALE)
    with pytest.raises(RuntimeError, match="mean and std need 3 values"):
        op(imgs, pv, pm, g, MEAN[:2], STD, RESCALE)
    with pytest.raises(RuntimeError, match="pixel_values must be contiguous"):
        op(imgs, pv.transpose(3, 4), pm, g, MEAN, STD, RESCALE)


@needs_ext
def test_preprocess_under_inference_mode():
    torch.set_num_threads(2)
    with torch.inference_mode():
        imgs, pv, pm, geometry = _batch([(0, _image(40, 70, seed=1))], 64, 16, torch.float32)
        torch.ops.idefics3_kit.preprocess_into(imgs, pv, pm, geometry, MEAN, STD, RESCALE)
        assert pm[0, :num_tiles(geometry)].eq(1).all()
