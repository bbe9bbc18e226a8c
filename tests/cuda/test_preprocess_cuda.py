"""GPU preprocessing op (issue 7): bit-equality with the CPU reference (Pillow) op.

Skipped without a CUDA device or without the CUDA kernel in the built extension. GPU validation
of these tests is pending (written on a machine without a GPU): see docs/cuda.md.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from idefics3_kit.ops import _library
from idefics3_kit.ops.preprocess import alloc_batch, preprocess_into
from idefics3_kit.ops.preprocess import preprocess_into_ref, resize_u8_ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MEAN, STD, RESCALE = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255


def _geometry_module():
    spec = importlib.util.spec_from_file_location(
        "_i3k_cuda_test_geometry", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_geometry.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_geo = _geometry_module()


@pytest.fixture(autouse=True)
def _need_kernel():
    if not _library.has_kernel("preprocess_into", "cuda"):
        pytest.skip("the extension has no CUDA preprocessing kernel")


def _image(rng, h, w, c=3):
    a = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    a[: h // 2] = np.linspace(0, 255, w).astype(np.uint8)[None, :, None]
    return torch.from_numpy(a)


def _run_both(images, sizes, longest, tile, dtype, mask_dtype, on_device):
    geometry, tiles = _geo.batch_geometry(sizes, longest, tile)
    b = len(sizes)
    ref_v = torch.zeros(b, tiles, 3, tile, tile, dtype=dtype)
    ref_m = torch.zeros(b, tiles, tile, tile, dtype=mask_dtype)
    preprocess_into_ref(images, ref_v, ref_m, geometry, MEAN, STD, RESCALE)
    got_v, got_m = alloc_batch(b, tiles, tile, dtype=dtype, mask_dtype=mask_dtype, device="cuda")
    got_v.fill_(float("nan"))  # poison: padding tiles must be left alone, real ones all written
    ref_v_p = ref_v.clone()
    pad = ref_m.flatten(2).amax(-1) == 0
    ref_v_p[pad] = float("nan")
    imgs = [im.cuda() for im in images] if on_device else images
    preprocess_into(imgs, got_v, got_m, geometry, MEAN, STD, RESCALE)
    torch.cuda.synchronize()
    return got_v.cpu(), got_m.cpu(), ref_v_p, ref_m


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 400)), min_size=0, max_size=3),
                min_size=1, max_size=3),
       st.sampled_from([(112, 28), (56, 56), (96, 32)]),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_matches_reference(sizes, geom, dtype, on_device, seed):
    rng = np.random.default_rng(seed)
    images = [_image(rng, h, w) for sample in sizes for (h, w) in sample]
    if not images:
        return
    got_v, got_m, ref_v, ref_m = _run_both(images, sizes, *geom, dtype, torch.int64, on_device)
    assert torch.equal(got_m, ref_m)
    assert torch.equal(_bits(got_v), _bits(ref_v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool])
def test_idefics3_geometry_real_sizes(dtype, mask_dtype):
    rng = np.random.default_rng(0)
    sizes = [[(900, 1600)], [(1080, 1920), (333, 500)], [(2000, 100)]]
    images = [_image(rng, h, w) for sample in sizes for (h, w) in sample]
    got_v, got_m, ref_v, ref_m = _run_both(images, sizes, 1456, 364, dtype, mask_dtype, False)
    assert torch.equal(got_m, ref_m)
    assert torch.equal(_bits(got_v), _bits(ref_v))


def test_side_stream_and_no_sync():
    rng = np.random.default_rng(1)
    sizes = [[(300, 500)]]
    images = [_image(rng, 300, 500)]
    geometry, tiles = _geo.batch_geometry(sizes, 112, 28)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pv, pm = alloc_batch(1, tiles, 28, device="cuda")
        preprocess_into(images, pv, pm, geometry, MEAN, STD, RESCALE)
    s.synchronize()
    ref_v = torch.zeros(1, tiles, 3, 28, 28)
    ref_m = torch.zeros(1, tiles, 28, 28, dtype=torch.int64)
    preprocess_into_ref(images, ref_v, ref_m, geometry, MEAN, STD, RESCALE)
    assert torch.equal(pv.cpu(), ref_v) and torch.equal(pm.cpu(), ref_m)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 300), st.integers(1, 300), st.sampled_from([1, 3]),
       st.integers(0, 2**31 - 1))
def test_resize_u8_matches_pillow(h, w, oh, ow, c, seed):
    if not _library.has_kernel("resize_u8", "cuda"):
        pytest.skip("no CUDA resize_u8 kernel")
    img = _image(np.random.default_rng(seed), h, w, c)
    got = torch.ops.idefics3_kit.resize_u8(img.cuda(), oh, ow).cpu()
    assert torch.equal(got, resize_u8_ref(img, oh, ow))


def test_opcheck_resize_u8():
    if not _library.has_kernel("resize_u8", "cuda"):
        pytest.skip("no CUDA resize_u8 kernel")
    img = _image(np.random.default_rng(2), 50, 70).cuda()
    torch.library.opcheck(torch.ops.idefics3_kit.resize_u8.default, (img, 20, 90),
                          test_utils=("test_schema", "test_faketensor"))


def test_matches_compiled_cpu_op():
    """Also bit-equal to the compiled CPU kernel (when the extension has one)."""
    try:
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key("idefics3_kit::preprocess_into", "CPU")
    except RuntimeError:
        has_cpu = False
    if not has_cpu:
        pytest.skip("no compiled CPU preprocessing kernel")
    rng = np.random.default_rng(5)
    sizes = [[(900, 1600), (250, 251)], [(77, 1000)]]
    images = [_image(rng, h, w) for sample in sizes for (h, w) in sample]
    geometry, tiles = _geo.batch_geometry(sizes, 1456, 364)
    cpu_v = torch.zeros(2, tiles, 3, 364, 364, dtype=torch.bfloat16)
    cpu_m = torch.zeros(2, tiles, 364, 364, dtype=torch.int64)
    torch.ops.idefics3_kit.preprocess_into(images, cpu_v, cpu_m, geometry, list(MEAN), list(STD), RESCALE)
    gpu_v, gpu_m = alloc_batch(2, tiles, 364, dtype=torch.bfloat16, device="cuda")
    preprocess_into(images, gpu_v, gpu_m, geometry, MEAN, STD, RESCALE)
    assert torch.equal(gpu_m.cpu(), cpu_m)
    assert torch.equal(_bits(gpu_v.cpu()), _bits(cpu_v))
