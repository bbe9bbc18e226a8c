"""Images and bytes: whatever arrives (random bytes, a real file cut or flipped, arrays of any
shape and dtype), ``to_rgb`` gives uint8 RGB [H, W, 3] or a ValueError naming the image."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from idefics3_kit.processing.images import image_size, to_rgb
from tests.fuzz.outcomes import fuzz, outcome


def encoded(fmt: str, size=(9, 7), mode="RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format=fmt)
    return buffer.getvalue()


SAMPLES = [encoded("PNG"), encoded("JPEG"), encoded("GIF", mode="P"), encoded("BMP"), encoded("WEBP"),
           encoded("PNG", mode="I;16"), encoded("TIFF", mode="CMYK")]


def check_result(kind, value):
    if kind == "ok":
        assert value.dtype == torch.uint8 and value.dim() == 3 and value.shape[2] == 3 and value.numel() > 0


@st.composite
def damaged(draw):
    """A real encoded image with bytes flipped, cut, or repeated."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


def check_bytes(data):
    kind, value = outcome(lambda: to_rgb(data, where="image 0 of sample 0", max_pixels=10 ** 6),
                          names=("image 0 of sample 0",))
    check_result(kind, value)


test_damaged_files, test_damaged_files_full = fuzz(damaged())(check_bytes)
test_random_bytes, test_random_bytes_full = fuzz(st.binary(min_size=0, max_size=300))(check_bytes)


arrays = hnp.arrays(dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int64, np.bool_,
                                           np.int8, np.complex64]),
                    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))


def check_array(arr):
    kind, value = outcome(lambda: to_rgb(arr, where="image 2"), names=("image 2",))
    check_result(kind, value)
    kind, value = outcome(lambda: to_rgb(torch.from_numpy(arr) if arr.dtype != np.uint16 else arr,
                                         where="image 2"), names=("image 2",))
    check_result(kind, value)


test_arrays, test_arrays_full = fuzz(arrays)(check_array)


def check_strings(text):
    kind, value = outcome(lambda: to_rgb(text, where="image 5"), names=("image 5",))
    check_result(kind, value)
    outcome(lambda: image_size(text), names=("image",))


test_strings, test_strings_full = fuzz(st.text(max_size=60) | st.sampled_from(
    ["data:image/png;base64,", "data:image/png;base64,!!!!", "http://example.com/x.png", "/", "/dev/null",
     "/proc/self/mem", ""]))(check_strings)


@pytest.mark.parametrize("source", [b"", b"\x89PNG\r\n\x1a\n", "/dev/zero", "/dev/null", object(), 3.5, None,
                                    [[1, 2]], np.zeros((0, 4, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)])
def test_hand_written_cases(source):
    kind, value = outcome(lambda: to_rgb(source, where="image 1"), names=("image 1",))
    check_result(kind, value)
