"""Image splitter: any image -> uint8 RGB -> resized tiles in ``pixel_values [B, T, 3, S, S]``.

``idefics3`` reproduces transformers' Idefics3 image processor (the Pillow backend,
``Idefics3ImageProcessorPil``) bit for bit:

1. RGB conversion first (alpha composited over white; L, LA, P, CMYK, ... through Pillow; files
   are loaded like transformers' ``load_image``: EXIF orientation applied, alpha dropped).
2. Stage 1: the longest edge is resized to ``longest_edge`` (always, up or down); the short side
   is ``int(L / aspect)`` (or ``int(L * aspect)``), bumped to even, at least 1; a hard cap of
   4096 on the long side follows.
3. Stage 2 (splitting on): both sides grow to multiples of the tile size ``S``.
4. Tiles of S×S in row-major order, then the global tile (stage 2 resized to S×S) last.
   Splitting off: stage 2 is S×S and is the only tile.
5. Every resize is Pillow LANCZOS on uint8; rescale/normalize with the float64-then-float32 recipe.

All geometry is computed here on the host from ints; the pixel work (steps 2-5) goes through
``ops.preprocess.preprocess_into`` so that a compiled kernel can replace it.

Deliberate differences from the reference (documented in docs/processor.md): plain 2-D
grayscale arrays are accepted; float arrays in [0, 1] are converted to uint8 once (no second
rescale); 16-bit images are scaled to 8 bits instead of clipped; images over a pixel limit,
corrupt files and modes without a meaningful RGB conversion are refused with a ValueError.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .. import ops
from ..ops import preprocess as preprocess_op
from ..registry import register

MAX_IMAGE_SIZE = 4096  # the reference's hard cap on the long side after stage 1
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
REFUSED_MODES = ("F",)  # float pixels of unknown range


# --------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SplitterConfig:
    """Resize/tile settings (the image part of a checkpoint's preprocessor config).

    Defaults are SmolVLM-256M's geometry (2048/512), the project's default model.
    ``fixed_size`` (height, width) replaces the longest-edge rule of stage 1 when set (the
    reference's ``size={"height", "width"}``). ``max_pixels``: None follows Pillow's
    ``Image.MAX_IMAGE_PIXELS`` at call time, 0 disables the check, >0 is the limit.
    """

    name: str = "idefics3"
    longest_edge: int = 2048
    tile_size: int = 512
    do_resize: bool = True
    do_image_splitting: bool = True
    fixed_size: tuple[int, int] | None = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    max_pixels: int | None = None

    def __post_init__(self):
        for f in ("longest_edge", "tile_size"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SplitterConfig.{f}: must be a positive integer, got {value!r}")
        for f in ("image_mean", "image_std"):
            value = tuple(float(x) for x in getattr(self, f))
            if len(value) != 3:
                raise ValueError(f"SplitterConfig.{f}: needs 3 values (R, G, B), got {len(value)}")
            object.__setattr__(self, f, value)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"SplitterConfig.image_std: must be non-zero, got {self.image_std}")
        if self.fixed_size is not None:
            size = tuple(int(x) for x in self.fixed_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"SplitterConfig.fixed_size: needs (height, width) > 0, got {self.fixed_size!r}")
            object.__setattr__(self, "fixed_size", size)
        if self.max_pixels is not None and self.max_pixels < 0:
            raise ValueError(f"SplitterConfig.max_pixels: must be None, 0 or positive, got {self.max_pixels}")

    def replace(self, **changes) -> "SplitterConfig":
        return dataclasses.replace(self, **changes)

    def pixel_limit(self) -> int | None:
        """The pixel count above which an image is refused (None: no limit)."""
        if self.max_pixels is None:
            from PIL import Image

            return Image.MAX_IMAGE_PIXELS
        return self.max_pixels or None

    # ---- Hugging Face preprocessor_config.json ------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict) -> "SplitterConfig":
        """Read an image-processor dict; missing keys take the reference's class defaults (1456/364)."""
        size = d.get("size") or {"longest_edge": 4 * 364}
        fixed = None
        if "longest_edge" not in size:
            if not ("height" in size and "width" in size):
                raise ValueError(f"preprocessor config: size must have 'longest_edge' or 'height' and 'width', "
                                 f"got {size}")
            fixed = (int(size["height"]), int(size["width"]))
        tile = (d.get("max_image_size") or {"longest_edge": 364}).get("longest_edge")
        if tile is None:
            raise ValueError(f"preprocessor config: max_image_size needs 'longest_edge', got {d['max_image_size']}")
        resample = d.get("resample", 1)
        if resample != 1:
            raise ValueError(f"preprocessor config: resample must be 1 (LANCZOS), got {resample}")
        for flag in ("do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if d.get(flag, True) is not True:
                raise ValueError(f"preprocessor config: {flag}=false is not supported (only the default true)")
        return cls(longest_edge=int(size.get("longest_edge", 4 * 364)), tile_size=int(tile),
                   do_resize=bool(d.get("do_resize", True)),
                   do_image_splitting=bool(d.get("do_image_splitting", True)), fixed_size=fixed,
                   image_mean=_triple(d.get("image_mean", 0.5)), image_std=_triple(d.get("image_std", 0.5)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)))

    def to_hf(self) -> dict:
        """The preprocessor_config.json contents that transformers' Idefics3 image processor reads."""
        size = ({"height": self.fixed_size[0], "width": self.fixed_size[1]} if self.fixed_size
                else {"longest_edge": self.longest_edge})
        return {
            "image_processor_type": "Idefics3ImageProcessor",
            "do_convert_rgb": True, "do_resize": self.do_resize, "size": size, "resample": 1,
            "do_image_splitting": self.do_image_splitting, "max_image_size": {"longest_edge": self.tile_size},
            "do_rescale": True, "rescale_factor": self.rescale_factor, "do_normalize": True,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_pad": True,
        }


def _triple(value) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(x) for x in value)


# --------------------------------------------------------------------------------------
# Geometry (host-side ints, exactly the reference's arithmetic)


@dataclass(frozen=True)
class TilePlan:
    """Where one image of ``height``×``width`` goes: both resize stages and the tile grid.

    ``rows = cols = 0`` means a single S×S tile (no global tile); otherwise ``rows*cols`` tiles
    plus the global one.
    """

    height: int
    width: int
    resized: tuple[int, int]  # stage 1 (h1, w1)
    grid_size: tuple[int, int]  # stage 2 (h2, w2): rows*S × cols*S, or S×S unsplit
    rows: int
    cols: int
    tile_size: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows * self.cols else 1


def stage1_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Longest edge to ``longest_edge``; short side truncated, bumped to even; then the 4096 cap."""
    aspect = width / height  # Python double, as the reference
    if width >= height:
        new_w = longest_edge
        new_h = int(new_w / aspect)
        new_h += new_h % 2
    else:
        new_h = longest_edge
        new_w = int(new_h * aspect)
        new_w += new_w % 2
    new_h, new_w = max(new_h, 1), max(new_w, 1)
    aspect = new_w / new_h
    if new_w >= new_h and new_w > MAX_IMAGE_SIZE:  # cap pass: truncation, no even rule
        new_w, new_h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif new_h > new_w and new_h > MAX_IMAGE_SIZE:
        new_h, new_w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(new_h, 1), max(new_w, 1)


def stage2_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Grow to tile multiples: the long side rounds up, the short side follows its aspect, rounds up."""
    aspect = width / height
    if width >= height:
        new_w = math.ceil(width / tile) * tile
        new_h = math.ceil(int(new_w / aspect) / tile) * tile
    else:
        new_h = math.ceil(height / tile) * tile
        new_w = math.ceil(int(new_h * aspect) / tile) * tile
    return new_h, new_w


def plan_tiles(height: int, width: int, cfg: SplitterConfig) -> TilePlan:
    """The full geometry of one image, from its size alone."""
    if height < 1 or width < 1:
        raise ValueError(f"cannot plan an empty image of {height}x{width} (height x width)")
    s = cfg.tile_size
    if not cfg.do_resize:
        h1, w1 = height, width
    elif cfg.fixed_size is not None:
        h1, w1 = cfg.fixed_size
    else:
        h1, w1 = stage1_size(height, width, cfg.longest_edge)
    if not cfg.do_image_splitting:
        return TilePlan(height, width, (h1, w1), (s, s), 0, 0, s)
    h2, w2 = stage2_size(h1, w1, s)
    if h2 < 1 or w2 < 1:  # transformers' processor fails on these too (its resize gets a 0 size)
        raise ValueError(f"image of {height}x{width} (height x width) is too thin to split: resized to {h1}x{w1}, "
                         f"its tile grid would be {h2}x{w2} pixels at tile_size {s}; pad it, or pass "
                         "do_image_splitting=False")
    if h2 > s or w2 > s:
        return TilePlan(height, width, (h1, w1), (h2, w2), h2 // s, w2 // s, s)
    return TilePlan(height, width, (h1, w1), (h2, w2), 0, 0, s)


# --------------------------------------------------------------------------------------
# Image conversion: anything -> uint8 [H, W, 3] RGB


def _pixel_check(height: int, width: int, where: str, limit: int | None) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{where} is empty ({width}x{height} pixels, width x height)")
    if limit is not None and height * width > limit:
        raise ValueError(f"{where} has {height * width} pixels ({width}x{height}), over the limit of {limit} "
                         f"(a decompression-bomb guard: raise SplitterConfig.max_pixels or "
                         f"PIL.Image.MAX_IMAGE_PIXELS to allow it)")


def open_image(source, where: str, limit: int | None, decode: bool = True):
    """Open a path or encoded bytes with Pillow and decode it now, so corrupt data fails here
    (``decode=False``: read the header only, enough for the size). EXIF orientation is not applied."""
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"{len(source)} bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source))
            _pixel_check(img.height, img.width, f"{where} ({name})", limit)
            if decode:
                img.load()
    except FileNotFoundError:
        raise ValueError(f"{where}: image file not found: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: cannot decode image ({name}): {exc}") from None
    return img


def load_encoded(source, where: str, limit: int | None):
    """A file path, encoded bytes or base64 string -> an upright PIL image, as transformers' ``load_image``.

    Like ``load_image`` the EXIF orientation is applied; URLs are refused (nothing is downloaded).
    """
    from PIL import ImageOps

    if isinstance(source, str) and not os.path.isfile(source):
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


# --------------------------------------------------------------------------------------
# The splitter component


@dataclass
class PreparedBatch:
    """Images converted to uint8 RGB and planned, before any pixel work (see ``Idefics3Splitter.prepare``)."""

    rgb: list[list[torch.Tensor]]  # per sample, uint8 [H, W, 3]
    plans: list[list[TilePlan]]
    config: SplitterConfig


@dataclass
class SplitResult:
    """pixel_values [B, T, 3, S, S], pixel_attention_mask [B, T, S, S] int64, one plan per image."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    plans: list[list[TilePlan]]


@register("splitter", "idefics3")
class Idefics3Splitter:
    """The Idefics3 image splitter: RGB conversion, two LANCZOS resizes, row-major tiles + global tile."""

    config_class = SplitterConfig

    def __init__(self, cfg: SplitterConfig | None = None):
        self.config = cfg or SplitterConfig()

    @property
    def tile_size(self) -> int:
        return self.config.tile_size

    def settings(self, **overrides) -> SplitterConfig:
        """The config with per-call overrides (None values ignored), validated again."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return self.config.replace(**changes) if changes else self.config

    def plan(self, height: int, width: int, **overrides) -> TilePlan:
        """Rows, cols and tiles for an image of ``height``×``width``, without touching pixels."""
        return plan_tiles(int(height), int(width), self.settings(**overrides))

    def convert(self, images: Sequence[Sequence[Any]], max_pixels: int | None = None,
                ) -> list[list[torch.Tensor]]:
        """Every image to uint8 [H, W, 3], all of them before any pixel work (nothing half-done)."""
        flat_index = 0
        converted = []
        for sample_index, sample in enumerate(images):
            row = []
            for position, image in enumerate(sample):
                where = f"image {flat_index} (sample {sample_index}, position {position})"
                row.append(to_rgb(image, where, max_pixels))
                flat_index += 1
            converted.append(row)
        return converted

    def __call__(self, images: Sequence[Sequence[Any]], dtype: torch.dtype = torch.float32,
                 **overrides) -> SplitResult:
        """A batch (one list of images per sample, possibly empty) -> padded tile tensors."""
        return self.fill(self.prepare(images, **overrides), dtype)

    def prepare(self, images: Sequence[Sequence[Any]], **overrides) -> PreparedBatch:
        """Convert and plan every image; all errors about the images surface here, before pixel work."""
        cfg = self.settings(**overrides)
        rgb = self.convert(images, cfg.pixel_limit())
        plans = [[plan_tiles(img.shape[0], img.shape[1], cfg) for img in sample] for sample in rgb]
        return PreparedBatch(rgb, plans, cfg)

    def fill(self, batch: PreparedBatch, dtype: torch.dtype = torch.float32, device=None) -> SplitResult:
        """Allocate the padded batch and let the preprocess op fill it.

        With a CUDA ``device`` and the CUDA kernel built, the batch is allocated on the GPU and
        filled there from the host images (bit-equal to the CPU op); otherwise it is filled on
        the CPU and moved.
        """
        rgb, plans, cfg = batch.rgb, batch.plans, batch.config
        s = cfg.tile_size
        max_tiles = max((sum(p.tiles for p in sample) for sample in plans), default=0)
        target = torch.device(device) if device is not None else torch.device("cpu")
        on_gpu = target.type == "cuda" and _cuda_kernel_available()
        alloc = target if on_gpu else torch.device("cpu")
        # Uninitialized: the op writes every tile an image fills, and only the padding tiles of
        # samples with fewer tiles are zeroed here (zeroing all of it first cost as much as a
        # resize: tens of megabytes at SmolVLM's 512-px tiles).
        # On the CPU from the pool (ops.empty_pooled): repeated calls reuse pages already faulted
        # in instead of having the kernel zero ~70 MB of fresh memory each time.
        if alloc.type == "cpu":
            pixel_values = ops.empty_pooled((len(rgb), max_tiles, 3, s, s), dtype)
            pixel_mask = ops.empty_pooled((len(rgb), max_tiles, s, s), torch.int64)
        else:
            pixel_values = torch.empty(len(rgb), max_tiles, 3, s, s, dtype=dtype, device=alloc)
            pixel_mask = torch.empty(len(rgb), max_tiles, s, s, dtype=torch.int64, device=alloc)
        flat_images, geometry = [], []
        for sample_index, (sample_rgb, sample_plans) in enumerate(zip(rgb, plans)):
            first_tile = 0
            for img, p in zip(sample_rgb, sample_plans):
                flat_images.append(img)
                geometry += [sample_index, first_tile, *p.resized, *p.grid_size, p.rows, p.cols]
                first_tile += p.tiles
            pixel_values[sample_index, first_tile:].zero_()  # padding tiles: 0, masked out
            pixel_mask[sample_index, first_tile:].zero_()
        if flat_images:
            preprocess_op.preprocess_into(flat_images, pixel_values, pixel_mask, geometry,
                                          cfg.image_mean, cfg.image_std, cfg.rescale_factor)
        if alloc != target:
            pixel_values, pixel_mask = pixel_values.to(target), pixel_mask.to(target)
        return SplitResult(pixel_values, pixel_mask, plans)


def _cuda_kernel_available() -> bool:
    from ..ops import _library, cuda_dispatch

    return _library.use_compiled() and cuda_dispatch.has_cuda_kernel("preprocess_into")
