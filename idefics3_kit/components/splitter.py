"""Image splitter: uint8 RGB images -> resized tiles in ``pixel_values [B, T, 3, S, S]``.

``idefics3`` reproduces transformers' Idefics3 image processor (the Pillow backend,
``Idefics3ImageProcessorPil``) bit for bit, on images already converted to uint8 RGB
[H, W, 3] tensors (``idefics3_kit.processing.images.to_rgb`` does that, as the Processor does):

1. Stage 1: the longest edge is resized to ``longest_edge`` (always, up or down); the short side
   is ``int(L / aspect)`` (or ``int(L * aspect)``), bumped to even, at least 1; a hard cap of
   4096 on the long side follows.
2. Stage 2 (splitting on): both sides grow to multiples of the tile size ``S``.
3. Tiles of S×S in row-major order, then the global tile (stage 2 resized to S×S) last.
   Splitting off: stage 2 is S×S and is the only tile.
4. Every resize is Pillow LANCZOS on uint8; rescale/normalize with the float64-then-float32 recipe.

All geometry is computed here on the host from ints (``TilePlan``, which also owns the prompt
layout and token cost of an image); the pixel work (steps 2-4) goes through
``ops.preprocess_into`` so that a compiled kernel can replace it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import ops
from ..ops import preprocess as preprocess_op
from ..registry import register

MAX_IMAGE_SIZE = 4096  # the reference's hard cap on the long side after stage 1
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TAG = "<global-img>"


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
        c = "SplitterConfig"
        for f in ("longest_edge", "tile_size"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{c}.{f}: must be a positive integer, got {value!r}")
        for f in ("do_resize", "do_image_splitting"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{c}.{f}: must be true or false, got {getattr(self, f)!r}")
        for f in ("image_mean", "image_std"):
            object.__setattr__(self, f, _rgb_triple(getattr(self, f), f"{c}.{f}"))
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"{c}.image_std: must be non-zero, got {self.image_std}")
        rescale = self.rescale_factor
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not math.isfinite(rescale) \
                or rescale <= 0:
            raise ValueError(f"{c}.rescale_factor: must be a finite number > 0, got {rescale!r}")
        if self.fixed_size is not None:
            size = tuple(self.fixed_size) if isinstance(self.fixed_size, (list, tuple)) else ()
            if len(size) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in size):
                raise ValueError(f"{c}.fixed_size: needs (height, width), positive integers, got {self.fixed_size!r}")
            object.__setattr__(self, "fixed_size", size)
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 0):
            raise ValueError(f"{c}.max_pixels: must be None, 0 or a positive integer, got {self.max_pixels!r}")

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
        """Read an image-processor dict; missing keys take the reference's class defaults (1456/364).
        Values of the wrong type (a string where a boolean belongs, an empty size) are refused."""
        where = "preprocessor config"
        size = _size_dict(d.get("size", {"longest_edge": 4 * 364}), f"{where}: size")
        fixed = None
        if "longest_edge" not in size:
            if not ("height" in size and "width" in size):
                raise ValueError(f"{where}: size must have 'longest_edge' or 'height' and 'width', got {size}")
            fixed = (size["height"], size["width"])
        tile = _size_dict(d.get("max_image_size", {"longest_edge": 364}), f"{where}: max_image_size")
        if "longest_edge" not in tile:
            raise ValueError(f"{where}: max_image_size needs 'longest_edge', got {tile}")
        resample = d.get("resample", 1)
        if resample != 1:
            raise ValueError(f"{where}: resample must be 1 (LANCZOS), got {resample!r}")
        for flag in ("do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if d.get(flag, True) is not True:
                raise ValueError(f"{where}: {flag}={d[flag]!r} is not supported (only the default true)")
        flags: dict[str, bool] = {}
        for flag in ("do_resize", "do_image_splitting"):
            value = d.get(flag, True)
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {flag} must be true or false, got {value!r}")
            flags[flag] = value
        return cls(longest_edge=size.get("longest_edge", 4 * 364), tile_size=tile["longest_edge"], fixed_size=fixed,
                   image_mean=_rgb_triple(d.get("image_mean", 0.5), f"{where}: image_mean"),
                   image_std=_rgb_triple(d.get("image_std", 0.5), f"{where}: image_std"),
                   rescale_factor=d.get("rescale_factor", 1 / 255), do_resize=flags["do_resize"],
                   do_image_splitting=flags["do_image_splitting"])

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


def _rgb_triple(value, where: str) -> tuple[float, float, float]:
    """Three finite numbers (one given for all three channels is repeated)."""
    if hasattr(value, "tolist"):  # numpy / torch
        value = value.tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{where}: needs 3 values (R, G, B), got {value!r}")
    if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise ValueError(f"{where}: must be finite numbers, got {value!r}")
    r, g, b = value
    return float(r), float(g), float(b)


def _size_dict(value, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: must be a non-empty object such as {{'longest_edge': 1456}}, got {value!r}")
    for key, size in value.items():
        if key not in ("longest_edge", "height", "width", "shortest_edge"):
            raise ValueError(f"{where}: unknown key {key!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {size!r}")
    return value


# --------------------------------------------------------------------------------------
# Geometry (host-side ints, exactly the reference's arithmetic)


@dataclass(frozen=True)
class TilePlan:
    """Where one image of ``height``×``width`` goes, and what it costs: the one owner of tiles,
    rows/cols, the prompt layout and token cost, and the ints the preprocessing kernel takes.

    ``rows = cols = 0`` means a single S×S tile (no global tile); otherwise ``rows*cols`` tiles
    plus the global one. ``image_seq_len`` (``<image>`` tokens per tile) and ``prompt_tokens``
    (every token the image adds to a prompt, tags included, for one tokenizer) are filled in by
    the Processor, which knows them; the splitter leaves them 0 / None.
    """

    height: int
    width: int
    resized: tuple[int, int]  # stage 1 (h1, w1)
    grid_size: tuple[int, int]  # stage 2 (h2, w2): rows*S × cols*S, or S×S unsplit
    rows: int
    cols: int
    tile_size: int
    image_seq_len: int = 0
    prompt_tokens: int | None = None

    @property
    def tiles(self) -> int:
        return ops.tile_count(self.rows, self.cols)

    @property
    def image_tokens(self) -> int:
        """``<image>`` tokens of this image: tiles × image_seq_len."""
        return self.tiles * self.image_seq_len

    @property
    def fake_tokens(self) -> int:
        """``<fake_token_around_image>`` tokens: one before each tile, two around the global block."""
        return self.rows * self.cols + 2

    def prompt_text(self, image_seq_len: int | None = None) -> str:
        """The text that replaces this image's ``<image>`` in a prompt (see ``image_prompt``)."""
        return image_prompt(self.rows, self.cols, image_seq_len or self.image_seq_len)

    def geometry(self, sample: int, first_tile: int) -> list[int]:
        """The 8 ints ``ops.preprocess_into`` takes for this image (``GEOMETRY_FIELDS`` order)."""
        return [sample, first_tile, *self.resized, *self.grid_size, self.rows, self.cols]


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The Idefics3 token layout of one image with ``rows``×``cols`` tiles (reference §2.3)::

        for each row r:  <fake><row_r_col_1><image>×S ... <fake><row_r_col_C><image>×S \\n
        then:            \\n<fake><global-img><image>×S<fake>

    and for an unsplit image only the last (global) block (``<fake>`` = ``<fake_token_around_image>``).
    """
    tile_tokens = IMAGE_TOKEN * image_seq_len
    global_block = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{tile_tokens}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_block
    lines = ["".join(f"{FAKE_IMAGE_TOKEN}<row_{r}_col_{c}>{tile_tokens}" for c in range(1, cols + 1)) + "\n"
             for r in range(1, rows + 1)]
    return "".join(lines) + "\n" + global_block


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
# The splitter component


@dataclass
class PreparedBatch:
    """Images checked and planned, before any pixel work (see ``Idefics3Splitter.prepare``)."""

    rgb: list[list[torch.Tensor]]  # per sample, uint8 [H, W, 3]
    plans: list[list[TilePlan]]
    config: SplitterConfig


@dataclass
class SplitResult:
    """pixel_values [B, T, 3, S, S], pixel_attention_mask [B, T, S, S] int64, one plan per image."""

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor
    plans: list[list[TilePlan]]


def check_rgb(image, where: str) -> torch.Tensor:
    """The splitter's input contract: a uint8 [H, W, 3] tensor."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        got = (f"a {image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, torch.Tensor)
               else type(image).__name__)
        raise ValueError(f"{where}: the splitter takes uint8 RGB tensors [H, W, 3], got {got}; convert images with "
                         f"idefics3_kit.processing.images.to_rgb (the Processor does)")
    return image


@register("splitter", "idefics3")
class Idefics3Splitter:
    """The Idefics3 image splitter: two LANCZOS resizes, row-major tiles + global tile."""

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

    def __call__(self, images: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype = torch.float32,
                 **overrides) -> SplitResult:
        """A batch (one list of uint8 RGB images per sample, possibly empty) -> padded tile tensors."""
        return self.fill(self.prepare(images, **overrides), dtype)

    def prepare(self, images: Sequence[Sequence[torch.Tensor]], **overrides) -> PreparedBatch:
        """Check and plan every image; all errors about the images surface here, before pixel work."""
        cfg = self.settings(**overrides)
        rgb = [[check_rgb(img, f"image (sample {i}, position {j})") for j, img in enumerate(sample)]
               for i, sample in enumerate(images)]
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
        alloc = target if preprocess_op.fills_on(target.type) else torch.device("cpu")
        # Uninitialized: the op writes every tile an image fills, and only the padding tiles of
        # samples with fewer tiles are zeroed here (zeroing all of it first cost as much as a
        # resize: tens of megabytes at SmolVLM's 512-px tiles). On the CPU from the pool
        # (ops.empty_pooled): repeated calls reuse pages already faulted in instead of having the
        # kernel zero ~70 MB of fresh memory each time.
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
                geometry += p.geometry(sample_index, first_tile)
                first_tile += p.tiles
            pixel_values[sample_index, first_tile:].zero_()  # padding tiles: 0, masked out
            pixel_mask[sample_index, first_tile:].zero_()
        if flat_images:
            ops.preprocess_into(flat_images, pixel_values, pixel_mask, geometry, cfg.image_mean, cfg.image_std,
                                cfg.rescale_factor)
        if alloc != target:
            pixel_values, pixel_mask = pixel_values.to(target), pixel_mask.to(target)
        return SplitResult(pixel_values, pixel_mask, plans)
