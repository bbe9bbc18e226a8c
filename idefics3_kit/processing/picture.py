"""Pictures of a tile plan: the grid the splitter cuts, drawn over the image, and the global tile beside it.

The grid lines are the stage-2 tile boundaries mapped back onto the original image (stage 2 is an
aspect-distorting resize, so tiles may cover non-square regions of the photo). The thumbnail is the
real global tile the model sees (the same LANCZOS chain as the processor), not a preview.
"""

from __future__ import annotations

import io
import os

import torch

from .. import files, ops
from ..components.splitter import TilePlan

PANEL = 640  # longest side of the drawn image, in pixels
THUMB = 256  # side of the drawn global tile
MARGIN = 16
HEADER = 64
GRID_COLOUR = (255, 48, 48)
TEXT_COLOUR = (20, 20, 20)


def global_tile(rgb: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """uint8 [S, S, 3]: the tile that carries the whole image (the only tile when unsplit)."""
    s = plan.tile_size
    stage2 = ops.resize_u8(ops.resize_u8(rgb, *plan.resized), *plan.grid_size)
    return ops.resize_u8(stage2, s, s) if plan.rows * plan.cols else stage2


def summary(plan: TilePlan, image_seq_len: int) -> str:
    grid = f"{plan.rows}x{plan.cols} tiles + global" if plan.rows * plan.cols else "unsplit"
    return f"{grid} = {plan.tiles} tile(s) x {image_seq_len} = {plan.tiles * image_seq_len} image tokens"


def save_picture(picture, path: str | os.PathLike) -> None:
    """Write a PIL picture atomically (a killed run leaves the old file or the new one).

    The format follows the extension as PIL's own ``save`` would; PNG for an unknown one.
    """
    from PIL import Image

    image_format = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
    buffer = io.BytesIO()
    picture.save(buffer, format=image_format)
    files.write_bytes(path, buffer.getvalue())


def draw_plan(rgb: torch.Tensor, plan: TilePlan, image_seq_len: int):
    """A PIL image: the photo with the tile grid and labels, the global tile to its right, a title."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    scale = PANEL / max(height, width)
    shown_w, shown_h = max(1, round(width * scale)), max(1, round(height * scale))
    photo = Image.fromarray(rgb.numpy()).resize((shown_w, shown_h), Image.Resampling.LANCZOS if scale < 1
                                                 else Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (3 * MARGIN + shown_w + THUMB, HEADER + MARGIN + max(shown_h, THUMB + 24)), "white")
    canvas.paste(photo, (MARGIN, HEADER))
    draw = ImageDraw.Draw(canvas)
    font, small = ImageFont.load_default(size=18), ImageFont.load_default(size=14)
    draw.text((MARGIN, 8), summary(plan, image_seq_len), fill=TEXT_COLOUR, font=font)
    chain = (f"{width}x{height} -> {plan.resized[1]}x{plan.resized[0]} -> {plan.grid_size[1]}x{plan.grid_size[0]} "
             f"(width x height), tiles of {plan.tile_size}x{plan.tile_size}")
    draw.text((MARGIN, 34), chain, fill=TEXT_COLOUR, font=small)
    if plan.rows * plan.cols:
        _draw_grid(draw, plan, (MARGIN, HEADER), (shown_w, shown_h), small)
    thumb = Image.fromarray(global_tile(rgb, plan).numpy()).resize((THUMB, THUMB), Image.Resampling.LANCZOS)
    x = 2 * MARGIN + shown_w
    canvas.paste(thumb, (x, HEADER))
    draw.rectangle((x, HEADER, x + THUMB - 1, HEADER + THUMB - 1), outline=GRID_COLOUR, width=2)
    label = f"global tile ({plan.tile_size}x{plan.tile_size})" if plan.rows * plan.cols else \
        f"single tile ({plan.tile_size}x{plan.tile_size})"
    draw.text((x, HEADER + THUMB + 4), label, fill=TEXT_COLOUR, font=small)
    return canvas


def _draw_grid(draw, plan: TilePlan, origin, shown, font) -> None:
    """Tile borders at stage-2 multiples of S, mapped to the drawn photo; 'r,c' labels in reading order."""
    (x0, y0), (shown_w, shown_h) = origin, shown
    cell_w, cell_h = shown_w / plan.cols, shown_h / plan.rows  # stage 2 is rows*S × cols*S exactly
    for c in range(plan.cols + 1):
        x = x0 + min(round(c * cell_w), shown_w - 1)
        draw.line((x, y0, x, y0 + shown_h - 1), fill=GRID_COLOUR, width=2)
    for r in range(plan.rows + 1):
        y = y0 + min(round(r * cell_h), shown_h - 1)
        draw.line((x0, y, x0 + shown_w - 1, y), fill=GRID_COLOUR, width=2)
    for r in range(plan.rows):
        for c in range(plan.cols):
            x, y = x0 + c * cell_w + 4, y0 + r * cell_h + 3
            text = f"{r + 1},{c + 1}"
            box = draw.textbbox((x, y), text, font=font)
            draw.rectangle(box, fill="white")
            draw.text((x, y), text, fill=GRID_COLOUR, font=font)
