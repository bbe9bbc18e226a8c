"""Images in: any supported image -> uint8 RGB [H, W, 3], the form the splitter takes.

Follows transformers' Idefics3 image processor (the Pillow backend) and its ``load_image``:

- PIL images: alpha composited over white; L, LA, P, CMYK, ... through Pillow's ``convert``.
- Files, encoded bytes, base64 strings and ``data:image/...`` URIs: decoded now (so corrupt data
  fails here), EXIF orientation applied, alpha dropped. URLs are refused: nothing is downloaded.
- numpy arrays and torch tensors: [H, W], [C, H, W] or [H, W, C] (channels-first wins when
  ambiguous), uint8; 1, 3 or 4 channels.

Deliberate differences from the reference (docs/processor.md): plain 2-D grayscale arrays are
accepted; float arrays in [0, 1] are converted to uint8 once (no second rescale); 16-bit images
are scaled to 8 bits instead of clipped; images over a pixel limit, corrupt files and modes
without a meaningful RGB conversion are refused with a ValueError naming the image.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from .. import files

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
REFUSED_MODES = ("F",)  # float pixels of unknown range


def _pixel_check(height: int, width: int, where: str, limit: int | None) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{where} is empty ({width}x{height} pixels, width x height)")
    if limit is not None and height * width > limit:
        raise ValueError(f"{where} has {height * width} pixels ({width}x{height}), over the limit of {limit} "
                         f"(a decompression-bomb guard: raise SplitterConfig.max_pixels or "
                         f"PIL.Image.MAX_IMAGE_PIXELS to allow it)")


def open_image(source, where: str, limit: int | None, decode: bool = True):
    """Open a path or encoded bytes with Pillow and decode it now, so corrupt data fails here
    (``decode=False``: read the header only, enough for the size). EXIF orientation is not applied.

    Only regular files are opened (a FIFO would block for ever). Every error Pillow raises on bad
    data (including ValueError for an oversized PNG text chunk) becomes a ValueError naming the image.
    """
    from PIL import Image, UnidentifiedImageError

    is_path = isinstance(source, (str, os.PathLike))
    name = os.fspath(source) if is_path else f"{len(source)} bytes"
    if is_path and os.path.exists(source):
        try:
            files.regular_file(source)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source if is_path else io.BytesIO(source))
    except FileNotFoundError:
        raise ValueError(f"{where}: image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: cannot decode image ({name}): {exc}") from None
    _pixel_check(img.height, img.width, f"{where} ({name})", limit)
    if decode:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as exc:
            raise ValueError(f"{where}: cannot decode image ({name}): {exc}") from None
    return img


def load_encoded(source, where: str, limit: int | None):
    """A file path, encoded bytes or base64 string -> an upright PIL image, as transformers' ``load_image``.

    Like ``load_image`` the EXIF orientation is applied; URLs are refused (nothing is downloaded).
    """
    from PIL import ImageOps

    if isinstance(source, str) and not os.path.exists(source):
        source = string_source(source, where)
    img = open_image(source, where, limit)
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # malformed EXIF data raises assorted errors inside Pillow
        raise ValueError(f"{where}: cannot apply the EXIF orientation: {exc}") from None


def string_source(text: str, where: str):
    """A string that is not a file: a data URI or base64 (transformers accepts both), else not found."""
    import base64
    import binascii

    if text.startswith(("http://", "https://")):
        raise ValueError(f"{where}: URLs are not downloaded ({text}); fetch the image first")
    payload = text.split(",", 1)[1] if text.startswith("data:image/") else text
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = b""
    if len(data) < 8:  # not an encoded image either: report it as the missing file it most likely is
        raise ValueError(f"{where}: image file not found: {text[:200]}")
    return data


def _pil_to_rgb(img, where: str, alpha_over_white: bool = True) -> np.ndarray:
    """PIL image -> uint8 [H, W, 3]: alpha over white, 16-bit scaled, the rest via Pillow's convert.

    ``alpha_over_white=False`` drops alpha instead (plain ``convert("RGB")``), which is what
    transformers does to images it loads from files itself.
    """
    from PIL import Image

    mode = img.mode
    if mode in REFUSED_MODES:
        raise ValueError(f"{where}: unsupported image mode {mode!r} (float pixels of unknown range); "
                         f"convert it to 8-bit RGB or pass a float array in [0, 1]")
    try:
        if mode in SIXTEEN_BIT_MODES:
            return _gray_to_rgb(_sixteen_to_eight(np.asarray(img), where))
        if alpha_over_white and ("A" in img.getbands() or img.info.get("transparency") is not None):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(img if mode == "RGB" else img.convert("RGB"))  # one writable copy
    except (ValueError, OSError) as exc:
        raise ValueError(f"{where}: cannot convert image mode {mode!r} to RGB: {exc}") from None


def _sixteen_to_eight(values: np.ndarray, where: str) -> np.ndarray:
    """0..65535 -> 0..255 by rounding v/257 (the reference clips instead, turning photos white)."""
    values = np.asarray(values).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{where}: 16-bit image values must be in [0, 65535], got "
                         f"[{values.min()}, {values.max()}]")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def channels_last(arr: np.ndarray, where: str) -> np.ndarray:
    """[H, W] / [C, H, W] / [H, W, C] -> [H, W, C]; channels-first wins when ambiguous (the reference's rule)."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"{where}: an image array must have 2 or 3 dimensions, got shape {tuple(arr.shape)}")
    if arr.shape[0] in (1, 3, 4):
        return np.moveaxis(arr, 0, -1)
    if arr.shape[2] in (1, 3, 4):
        return arr
    raise ValueError(f"{where}: cannot find the channel axis of shape {tuple(arr.shape)} "
                     f"(1, 3 or 4 channels, first or last)")


def _to_uint8(hwc: np.ndarray, where: str) -> np.ndarray:
    """uint8 stays; uint16 is scaled; floats must lie in [0, 1] and are rounded once to uint8."""
    if hwc.dtype == np.uint8:
        return hwc
    if hwc.dtype == np.uint16:
        return _sixteen_to_eight(hwc, where)
    if np.issubdtype(hwc.dtype, np.floating):
        values = hwc.astype(np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(f"{where}: float image values must be finite and in [0, 1], got "
                             f"[{np.nanmin(values)}, {np.nanmax(values)}]")
        return np.round(values * 255.0).astype(np.uint8)
    raise ValueError(f"{where}: unsupported array dtype {hwc.dtype} (uint8, uint16 or float in [0, 1])")


def _array_to_rgb(arr: np.ndarray, where: str) -> np.ndarray:
    """Numpy array (2-D, HWC or CHW; 1/3/4 channels) -> uint8 [H, W, 3]; RGBA composited over white."""
    hwc = _to_uint8(channels_last(arr, where), where)
    channels = hwc.shape[2]
    if channels == 1:
        return _gray_to_rgb(hwc[:, :, 0])
    if channels == 3:
        return hwc
    alpha = hwc[:, :, 3:4] / 255.0  # float64, then round-half-even: the reference's numpy recipe
    return np.round(alpha * hwc[:, :, :3] + (1 - alpha) * 255).astype(np.uint8)


def is_image(obj) -> bool:
    """True for the things ``to_rgb`` accepts as one image."""
    from PIL import Image

    return isinstance(obj, (Image.Image, np.ndarray, torch.Tensor, str, bytes, os.PathLike))


def to_rgb(image, where: str = "image", max_pixels: int | None = None) -> torch.Tensor:
    """Any supported image -> uint8 torch [H, W, 3] (contiguous), or a ValueError naming ``where``."""
    from PIL import Image

    if isinstance(image, (str, bytes, os.PathLike)):
        rgb = _pil_to_rgb(load_encoded(image, where, max_pixels), where, alpha_over_white=False)
    elif isinstance(image, Image.Image):
        _pixel_check(image.height, image.width, where, max_pixels)
        rgb = _pil_to_rgb(image, where)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if arr.ndim in (2, 3) and 0 in arr.shape:
            raise ValueError(f"{where} is empty (array shape {tuple(arr.shape)})")
        hwc_shape = channels_last(arr, where).shape
        _pixel_check(hwc_shape[0], hwc_shape[1], where, max_pixels)
        rgb = _array_to_rgb(arr, where)
    else:
        raise ValueError(f"{where}: unsupported image type {type(image).__name__} "
                         f"(PIL image, numpy array, torch tensor, file path or encoded bytes)")
    if not (rgb.flags.c_contiguous and rgb.flags.writeable):
        rgb = np.array(rgb, order="C")  # torch wants writable memory; PIL's arrays are read-only
    return torch.from_numpy(rgb)


def to_rgb_batch(images: Sequence[Sequence[Any]], max_pixels: int | None = None) -> list[list[torch.Tensor]]:
    """Every image of a batch (one list per sample) to uint8 [H, W, 3], all of them before any
    pixel work, each error naming the image's place (nothing half-done)."""
    flat_index = 0
    converted = []
    for sample_index, sample in enumerate(images):
        row = []
        for position, image in enumerate(sample):
            row.append(to_rgb(image, f"image {flat_index} (sample {sample_index}, position {position})", max_pixels))
            flat_index += 1
        converted.append(row)
    return converted


def image_size(image) -> tuple[int, int]:
    """(width, height) of an image without decoding or converting its pixels."""
    from PIL import Image

    if isinstance(image, str) and not os.path.lexists(image):
        image = string_source(image, "image")
    if isinstance(image, (str, bytes, os.PathLike)):
        image = open_image(image, "image", None, decode=False)
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation with a quarter turn
            return image.height, image.width
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    shape = channels_last(np.asarray(image), "image").shape
    return shape[1], shape[0]
