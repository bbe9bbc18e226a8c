"""CPU-only check of the GPU preprocessing plan: the host driver runs the plan's jobs with the
kernels' per-element code and must reproduce the Pillow reference op bit for bit.

Needs g++ (skipped otherwise); no GPU, no compiled extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from idefics3_kit.ops.preprocess import normalize_lut, preprocess_into_ref


def _load_geometry():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_i3k_cuda_test_geometry", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_geometry.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


batch_geometry = _load_geometry().batch_geometry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD, RESCALE = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("pp") / "preprocess_plan_main"
    src = os.path.join(ROOT, "tests", "cuda", "host", "preprocess_plan_main.cpp")
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), src], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def resize_driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("rr") / "resize_ref_main"
    src = os.path.join(ROOT, "tests", "cuda", "host", "resize_ref_main.cpp")
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), src], check=True)
    return str(exe)


def _run_plan(driver, tmp_path, images, geometry, tiles, tile, bf16):
    lines = [f"{tile} {tiles} {1 + max(geometry[0::8])} {int(bf16)}"]
    for i, img in enumerate(images):
        p = tmp_path / f"img{i}.raw"
        img.numpy().tofile(p)
        lines.append(" ".join(str(x) for x in [img.shape[0], img.shape[1], *geometry[8 * i: 8 * i + 8], p]))
    (tmp_path / "spec.txt").write_text("\n".join(lines) + "\n")
    normalize_lut(MEAN, STD, RESCALE).numpy().astype(np.float32).tofile(tmp_path / "lut.raw")
    subprocess.run([driver, str(tmp_path / "spec.txt"), str(tmp_path / "lut.raw"), str(tmp_path / "v.raw"),
                    str(tmp_path / "m.raw")], check=True)
    b = 1 + max(geometry[0::8])
    if bf16:
        v = torch.from_numpy(np.fromfile(tmp_path / "v.raw", dtype=np.int16)).view(torch.bfloat16)
    else:
        v = torch.from_numpy(np.fromfile(tmp_path / "v.raw", dtype=np.float32))
    m = torch.from_numpy(np.fromfile(tmp_path / "m.raw", dtype=np.uint8))
    return v.reshape(b, tiles, 3, tile, tile), m.reshape(b, tiles, tile, tile)


def _images(rng, sizes):
    out = []
    for h, w in sizes:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[: h // 2] = np.linspace(0, 255, w, dtype=np.float64).astype(np.uint8)[None, :, None]  # smooth part
        out.append(torch.from_numpy(a))
    return out


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("longest,tile", [(112, 28), (56, 56), (60, 20)])
def test_plan_matches_pillow_reference(driver, tmp_path, bf16, longest, tile):
    rng = np.random.default_rng(longest * 7 + tile + bf16)
    # (112, 112) / (56, 56): input == stage 1 (alias) for some geometries, tiles read the input itself
    sizes = [[(45, 80), (80, 45), (28, 28)], [(7, 300), (300, 7), (112, 112)],
             [(113, 112), (1, 1), (56, 170), (56, 56)]]
    geometry, tiles = batch_geometry(sizes, longest, tile)
    images = _images(rng, [s for sample in sizes for s in sample])
    got_v, got_m = _run_plan(driver, tmp_path, images, geometry, tiles, tile, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    ref_v = torch.zeros(len(sizes), tiles, 3, tile, tile, dtype=dtype)
    ref_m = torch.zeros(len(sizes), tiles, tile, tile, dtype=torch.uint8)
    preprocess_into_ref(images, ref_v, ref_m, geometry, MEAN, STD, RESCALE)
    assert torch.equal(got_m, ref_m)
    bits = torch.int16 if bf16 else torch.int32
    assert torch.equal(got_v.view(bits), ref_v.view(bits))


@pytest.mark.parametrize("mode", ["reference", "plan"])
def test_resize_reference_matches_pillow(resize_driver, tmp_path, mode):
    from idefics3_kit.ops.preprocess import resize_u8_ref

    rng = np.random.default_rng(3)
    for _ in range(40):
        h, w, oh, ow = (int(x) for x in rng.integers(1, 90, 4))
        c = int(rng.choice([1, 3]))
        img = torch.from_numpy(rng.integers(0, 256, (h, w, c), dtype=np.uint8))
        img.numpy().tofile(tmp_path / "in.raw")
        flag = ["--plan"] if mode == "plan" else []
        subprocess.run([resize_driver, *flag, str(tmp_path / "in.raw"), str(tmp_path / "out.raw"), str(h), str(w),
                        str(c), str(oh), str(ow)], check=True)
        got = torch.from_numpy(np.fromfile(tmp_path / "out.raw", dtype=np.uint8)).reshape(oh, ow, c)
        assert torch.equal(got, resize_u8_ref(img, oh, ow)), (h, w, oh, ow, c)


def test_coefficient_selftest(resize_driver):
    subprocess.run([resize_driver, "--selftest"], check=True)
