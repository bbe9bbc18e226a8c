"""Image preprocessing op: resize chain, tiles, rescale/normalize, written into the batch.

The geometry (resized sizes, tile grid) is computed on the host by the splitter from plain
ints (its ``TilePlan`` packs them); this op only moves pixels. For each image it performs,
exactly as transformers' Idefics3 image processor with Pillow does:

    uint8 RGB [H, W, 3] --LANCZOS--> stage 1 [h1, w1] --LANCZOS--> stage 2 [h2, w2]
    rows*cols > 0: tiles of S×S in row-major order, then stage 2 --LANCZOS--> S×S global tile
    rows*cols = 0: stage 2 is already S×S and is the single tile
    each tile: float32(float64(u8) * rescale), then (x - mean[c]) / std[c] in float32

and writes the tiles into ``pixel_values[sample, first_tile:...]`` (fp32 or bf16) with the
matching ``pixel_mask`` entries set to 1. A resize to the same size is a copy (Pillow too).
With CUDA outputs the CUDA kernel fills them from host or device images (bit-equal).

Geometry per image, 8 ints: (sample, first_tile, h1, w1, h2, w2, rows, cols).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _library, fast_path

GEOMETRY_FIELDS = ("sample", "first_tile", "h1", "w1", "h2", "w2", "rows", "cols")


def tile_count(rows: int, cols: int) -> int:
    """Tiles one image takes: rows×cols plus the global tile, or a single tile when unsplit
    (rows = cols = 0). The op's layout rule; ``TilePlan.tiles`` asks here."""
    return rows * cols + 1 if rows * cols else 1


def normalize_lut(mean, std, rescale: float) -> torch.Tensor:
    """[3, 256] float32 table: the bit-exact rescale + normalize of every uint8 value."""
    u = np.arange(256, dtype=np.float64)
    scaled = (u * rescale).astype(np.float32)  # rescale in float64, then cast (transformers' order)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return torch.from_numpy(((scaled[None, :] - mean32) / std32).astype(np.float32))


def resize_u8_ref(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Pillow LANCZOS resize of a uint8 [H, W, C] tensor (C in 1, 3), the bit-exact reference."""
    from PIL import Image

    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize_u8 expects a uint8 [H, W, C] tensor, got {image.dtype} {tuple(image.shape)}")
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize_u8: output size must be positive, got {out_h}x{out_w}")
    h, w, c = image.shape
    if (h, w) == (out_h, out_w):
        return image.clone()
    arr = image.cpu().numpy()
    pil = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    out = np.asarray(pil.resize((out_w, out_h), Image.Resampling.LANCZOS, reducing_gap=None))
    return torch.from_numpy(out.reshape(out_h, out_w, c).copy())


def check_geometry(images, pixel_values, pixel_mask, geometry) -> None:
    """Every image's tiles lie inside the batch, no two images of a sample share a tile, and each
    image's sizes agree with its grid."""
    if len(geometry) != 8 * len(images):
        raise ValueError(f"preprocess: geometry needs 8 ints per image, got {len(geometry)} for {len(images)} images")
    if pixel_values.dim() != 5 or pixel_values.shape[2] != 3 or pixel_values.shape[3] != pixel_values.shape[4]:
        raise ValueError(f"preprocess: pixel_values must be [B, T, 3, S, S], got {tuple(pixel_values.shape)}")
    b, t, _, s, _ = pixel_values.shape
    if tuple(pixel_mask.shape) != (b, t, s, s):
        raise ValueError(f"preprocess: pixel_mask must be {(b, t, s, s)}, got {tuple(pixel_mask.shape)}")
    if pixel_values.device.type == "meta" or pixel_mask.device != pixel_values.device:
        raise ValueError(f"preprocess: pixel_values and pixel_mask must be on one device that holds data, got "
                         f"{pixel_values.device} and {pixel_mask.device}")
    spans: dict[int, list[tuple[int, int, int]]] = {}  # sample -> (first tile, end, image)
    for i, img in enumerate(images):
        sample, first, h1, w1, h2, w2, rows, cols = geometry[8 * i: 8 * i + 8]
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[2] != 3:
            raise ValueError(f"preprocess: image {i} must be uint8 [H, W, 3], got {img.dtype} {tuple(img.shape)}")
        if img.device.type == "meta":
            raise ValueError(f"preprocess: image {i} is on the meta device (it holds no pixels)")
        if rows < 0 or cols < 0:
            raise ValueError(f"preprocess: image {i}: rows and cols must be >= 0, got {rows}x{cols}")
        n_tiles = tile_count(rows, cols)
        if not (0 <= sample < b and 0 <= first and first + n_tiles <= t):
            raise ValueError(f"preprocess: image {i} writes tiles {first}..{first + n_tiles - 1} of sample "
                             f"{sample}, outside pixel_values {tuple(pixel_values.shape)}")
        spans.setdefault(sample, []).append((first, first + n_tiles, i))
        if rows * cols == 0 and (h2, w2) != (s, s):
            raise ValueError(f"preprocess: image {i} is unsplit, so stage 2 must be {s}x{s}, got {h2}x{w2}")
        if rows * cols and (h2, w2) != (rows * s, cols * s):
            raise ValueError(f"preprocess: image {i}: stage 2 {h2}x{w2} is not {rows}x{cols} tiles of {s}")
        if min(h1, w1, h2, w2) < 1:
            raise ValueError(f"preprocess: image {i}: sizes must be positive, got {(h1, w1, h2, w2)}")
    for sample, ranges in spans.items():
        ranges.sort()
        for (f0, e0, i0), (f1, e1, i1) in zip(ranges, ranges[1:]):
            if f1 < e0:
                a, z = sorted((i0, i1))
                raise ValueError(f"preprocess: images {a} and {z} both write tile {f1} of sample {sample} "
                                 f"(tiles {f0}..{e0 - 1} and {f1}..{e1 - 1})")


def _normalize_tile_into(tile: torch.Tensor, lut: np.ndarray, out: torch.Tensor) -> None:
    """uint8 [S, S, 3] -> ``out`` [3, S, S] through the table (one gather per channel).

    float32 CPU outputs are written in place through a numpy view (no temporaries); other dtypes
    (bf16) go through a float32 tile.
    """
    hwc = tile.numpy()
    if out.dtype == torch.float32 and out.device.type == "cpu" and out.is_contiguous():
        dest = out.numpy()
        for c in range(3):
            np.take(lut[c], hwc[:, :, c], out=dest[c])
        return
    out.copy_(torch.from_numpy(np.stack([np.take(lut[c], hwc[:, :, c]) for c in range(3)])))


def preprocess_into_ref(images, pixel_values, pixel_mask, geometry, mean, std, rescale) -> None:
    """Reference implementation (Pillow resizes, a float32 lookup table for the normalization)."""
    check_geometry(images, pixel_values, pixel_mask, geometry)
    lut = normalize_lut(mean, std, rescale).numpy()  # [3, 256]
    s = pixel_values.shape[-1]
    for i, img in enumerate(images):
        sample, first, h1, w1, h2, w2, rows, cols = geometry[8 * i: 8 * i + 8]
        stage2 = resize_u8_ref(resize_u8_ref(img.cpu(), h1, w1), h2, w2)  # [h2, w2, 3] uint8
        tiles = [stage2[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
        tiles.append(resize_u8_ref(stage2, s, s) if rows * cols else stage2)
        for j, tile in enumerate(tiles):
            _normalize_tile_into(tile, lut, pixel_values[sample, first + j])
        pixel_mask[sample, first:first + len(tiles)] = 1


def _compiled_fills(images, pixel_values, pixel_mask) -> bool:
    """The kernel for the outputs' device runs when the outputs and the images are plain tensors
    (the images may stay on the host for CUDA outputs) and, on CUDA, it passed its self-check."""
    if not pixel_values.is_contiguous() or not fast_path.usable("preprocess_into", (pixel_values, pixel_mask)):
        return False  # (the kernel writes contiguous tiles; the reference fills any layout)
    device = fast_path.plain_tensors(images)
    if device is None or device not in ("cpu", pixel_values.device.type):
        return False
    return pixel_values.device.type == "cpu" or _cuda_trusted("preprocess_into", pixel_values.device)


def _cuda_trusted(name: str, device) -> bool:
    return _library.kernel_trusted(name, (device,), lambda: selfcheck(name, device))


def selfcheck(name: str, device) -> tuple[bool, str]:
    """``resize_u8`` / ``preprocess_into`` on ``device`` against the Pillow reference on a small
    random image (a 2x3 grid + global tile): the kernels are bit-exact by construction."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (41, 59, 3), dtype=torch.uint8, generator=gen)
    if name == "resize_u8":
        out = _library.op("resize_u8")(image.to(device), 23, 31).cpu()
        ref = resize_u8_ref(image, 23, 31)
    else:
        geometry = [0, 0, 32, 48, 32, 48, 2, 3]  # sample, first tile, stage-1 size, stage-2 size, rows, cols
        mean, std = [0.5, 0.4, 0.3], [0.25, 0.5, 0.75]
        values, masks = alloc_batch(1, 7, 16, device=device)
        _library.op("preprocess_into")([image], values, masks, geometry, mean, std, 1 / 255)
        ref_values, ref_masks = alloc_batch(1, 7, 16)
        preprocess_into_ref([image], ref_values, ref_masks, geometry, mean, std, 1 / 255)
        out, ref = torch.cat([values.cpu().flatten(), masks.cpu().flatten().float()]), \
            torch.cat([ref_values.flatten(), ref_masks.flatten().float()])
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    differ = int((out.float() - ref.float()).abs().gt(1e-6).sum())
    return differ == 0, f"{differ} of {ref.numel()} values differ from the reference"


def fills_on(device_type: str) -> bool:
    """Whether outputs on this device type are filled where they are (the CPU always; CUDA with the
    kernel built); elsewhere the caller fills on the CPU and moves the result."""
    return device_type == "cpu" or _library.has_kernel("preprocess_into", device_type)


def preprocess_into(images, pixel_values, pixel_mask, geometry, mean, std, rescale) -> None:
    """Fill ``pixel_values``/``pixel_mask`` in place; the compiled op where it applies."""
    check_geometry(images, pixel_values, pixel_mask, geometry)
    if _compiled_fills(images, pixel_values, pixel_mask):
        _library.op("preprocess_into")([img.contiguous() for img in images], pixel_values, pixel_mask, [int(x) for x in geometry],
                                       [float(x) for x in mean], [float(x) for x in std], float(rescale))
        return
    if pixel_values.device.type != "cpu":  # the reference fills on the host, then moves
        host_v, host_m = pixel_values.cpu(), pixel_mask.cpu()
        preprocess_into_ref(images, host_v, host_m, geometry, mean, std, rescale)
        pixel_values.copy_(host_v)
        pixel_mask.copy_(host_m)
        return
    preprocess_into_ref(images, pixel_values, pixel_mask, geometry, mean, std, rescale)


def resize_u8(image: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Pillow-exact LANCZOS resize of uint8 [H, W, C]; the compiled op where it applies."""
    on_cpu = image.device.type == "cpu"
    if fast_path.usable("resize_u8", (image,)) and (on_cpu or _cuda_trusted("resize_u8", image.device)):
        return _library.op("resize_u8")(image.contiguous(), out_h, out_w)  # the kernel reads rows in place
    return resize_u8_ref(image, out_h, out_w)


def alloc_batch(batch: int, tiles: int, tile: int, *, device="cpu", dtype=torch.float32,
                mask_dtype=torch.int64):
    """Zeroed ``pixel_values`` [B, T, 3, S, S] and ``pixel_attention_mask`` [B, T, S, S] on ``device``.

    The op writes only the real tiles; padding tiles stay zero (as transformers pads).
    """
    pv = torch.zeros(batch, tiles, 3, tile, tile, device=device, dtype=dtype)
    pm = torch.zeros(batch, tiles, tile, tile, device=device, dtype=mask_dtype)
    return pv, pm


@_library.register_fake("resize_u8")
def _resize_u8_fake(image, out_h, out_w):
    torch._check(image.dim() == 3, lambda: "resize_u8: image must be [H, W, C]")
    return image.new_empty((out_h, out_w, image.shape[2]))


@_library.register_fake("preprocess_into")
def _preprocess_into_fake(images, pixel_values, pixel_mask, geometry, mean, std, rescale):
    # Images may stay on the host for outputs on another device (the CUDA kernel uploads them).
    _library.same_device("preprocess_into", (("pixel_values", pixel_values), ("pixel_mask", pixel_mask)))
    for i, img in enumerate(images):
        if img.device != pixel_values.device and img.device.type != "cpu":
            raise RuntimeError(f"preprocess_into: images[{i}] must be on the CPU or on the device of pixel_values "
                               f"({pixel_values.device}), got {img.device}")
    return None
