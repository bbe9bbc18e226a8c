"""Synthetic visual question answering: shapes, colours, counts, positions and words drawn
with Pillow, each image paired with a question whose answer is one or two words.

Used to train the small demo model that ships with the package and to evaluate it on fresh
images. Every example is a pure function of its seed, so a dataset is reproducible without
being stored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (235, 200, 25),
    "purple": (135, 55, 180),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("CAT", "DOG", "SUN", "BOX", "CAR", "HAT", "PEN", "MAP")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_KINDS = ("colour", "shape", "count", "side", "word")
# Training also asks for a description that names every shape with its cell, in reading order
# ("top left red circle bottom right blue square"): several supervised words per image about
# every object and where it is, where a question supervises one. Evaluation asks only
# QUESTION_KINDS.
TRAINING_KINDS = QUESTION_KINDS + ("describe",)
DESCRIBE_QUESTION = "Describe the image."


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    kind: str


@dataclass
class _Shape:
    kind: str
    colour: str
    box: tuple  # (x0, y0, x1, y1)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def centre_y(self) -> float:
        return (self.box[1] + self.box[3]) / 2


CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")


def _cell_of(shape: _Shape, width: int, height: int) -> int:
    """Which cell of the 2x2 grid (reading order) the shape's centre lies in."""
    return 2 * int(shape.centre_y >= height / 2) + int(shape.centre_x >= width / 2)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: _Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _place_shapes(rng: random.Random, width: int, height: int, count: int) -> list[_Shape]:
    """``count`` shapes of distinct kinds and colours, each inside its own cell of a 2x2 grid
    (no overlap). At the demo geometry every image is cut into exactly 2x2 tiles, so each
    shape is seen whole by one tile encoder: a shape cut in half by a tile border is encoded as
    two unrelated halves (the tiles do not attend to each other) and the squashed global tile
    alone is too coarse to tell a 12-pixel circle from a square.
    """
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    cell_w, cell_h = width / 2, height / 2
    cells = sorted(rng.sample(range(4), count))  # reading order: top row first, left to right
    shapes = []
    for kind, colour, cell in zip(kinds, colours, cells):
        size = int(min(cell_w, cell_h) * rng.uniform(0.55, 0.85))
        x0 = int((cell % 2) * cell_w + rng.uniform(0, cell_w - size))
        y0 = int((cell // 2) * cell_h + rng.uniform(0, cell_h - size))
        shapes.append(_Shape(kind, colour, (x0, y0, x0 + size, y0 + size)))
    return shapes


def _background(rng: random.Random) -> tuple:
    grey = rng.randint(225, 255)
    return (grey, grey, rng.randint(225, 255))


# (width, height) of the images: all split into 2x2 tiles plus the global tile at the demo
# geometry, and none is further than 5:4 from square. The global tile squashes an image to a
# square, so wide images would turn circles into ellipses and squares into bars: a small vision
# tower trained from scratch learns shapes in a few hundred steps on near-square images and
# not at all in thousands on 3:1 ones (measured while training the shipped model).
IMAGE_SIZES = ((96, 96), (128, 128), (160, 160), (192, 192), (160, 128), (128, 160), (192, 160), (160, 192))


# Words are drawn bold (a stroke of this many pixels around the glyphs): the global tile shrinks
# an image about 3x, and thin strokes of 1-2 pixels there are what a small tower trained from
# scratch could not read.
WORD_STROKE = 2


def make_image(rng: random.Random, kind: str, max_shapes: int = 3):
    """An image for a question kind: (image, shapes drawn, word drawn or None).

    ``max_shapes`` < 3 makes easier images for the start of a curriculum (side questions
    still get two shapes).
    """
    width, height = rng.choice(IMAGE_SIZES)
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    if kind == "word":
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=int(min(width, height) * 0.42))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=WORD_STROKE)
        x = rng.uniform(0, max(width - (right - left), 0)) - left
        y = rng.uniform(0, max(height - (bottom - top), 0)) - top
        colour = COLOURS[rng.choice(("red", "blue", "green", "purple"))]
        draw.text((x, y), word, fill=colour, font=font, stroke_width=WORD_STROKE, stroke_fill=colour)
        return image, [], word
    count = rng.randint(2, max(2, max_shapes)) if kind == "side" else rng.randint(1, max_shapes)
    shapes = _place_shapes(rng, width, height, count)
    for shape in shapes:
        _draw_shape(draw, shape)
    return image, shapes, None


def _question(rng: random.Random, kind: str, shapes: list[_Shape], word, width: int, height: int) -> tuple[str, str]:
    if kind == "word":
        return "What word is written?", word.lower()
    if kind == "describe":
        if word is not None:
            return DESCRIBE_QUESTION, word.lower()
        # reading order, each shape after its cell: "top left red circle bottom right blue square"
        return DESCRIBE_QUESTION, " ".join(f"{CELL_NAMES[_cell_of(s, width, height)]} {s.colour} {s.kind}"
                                           for s in shapes)
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(shapes)]
    target = rng.choice(shapes)
    if kind == "colour":
        return f"What colour is the {target.kind}?", target.colour
    if kind == "shape":
        return f"What shape is {target.colour}?", target.kind
    # side: which half of the image the shape is in (2-3 shapes, each inside a grid cell)
    return f"Is the {target.kind} on the left or the right?", "left" if target.centre_x < width / 2 else "right"


def make_example(seed: int, kind: str | None = None, kinds: tuple = QUESTION_KINDS, max_shapes: int = 3) -> Example:
    """The example numbered ``seed``: of ``kind``, or of one drawn from ``kinds`` (repeat a kind
    to draw it more often), with at most ``max_shapes`` shapes (1 to 3)."""
    if not 1 <= max_shapes <= 3:
        raise ValueError(f"max_shapes must be 1, 2 or 3, got {max_shapes}")
    rng = random.Random(seed)
    kind = kind or rng.choice(kinds)
    if kind not in TRAINING_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {list(TRAINING_KINDS)}")
    image, shapes, word = make_image(rng, "word" if kind == "describe" and rng.random() < 0.2 else kind,
                                    max_shapes)
    question, answer = _question(rng, kind, shapes, word, image.width, image.height)
    return Example(image, question, answer, kind)


def corpus_lines() -> list[str]:
    """Every question and answer the generator can produce (to train the tokenizer on)."""
    lines = ["What word is written?", "How many shapes are there?"]
    lines += [f"What colour is the {s}?" for s in SHAPES]
    lines += [f"What shape is {c}?" for c in COLOURS]
    lines += [f"Is the {s} on the left or the right?" for s in SHAPES]
    lines += list(COLOURS) + list(SHAPES) + [w.lower() for w in WORDS] + list(COUNT_WORDS.values())
    lines += ["left", "right", "User:", "Assistant:", "What is in this image?", DESCRIBE_QUESTION]
    lines += [f"{cell} {c} {s}" for cell in CELL_NAMES for c in COLOURS for s in SHAPES]
    return lines


# ---- labels per tile, for warming up a vision tower before the VLM sees it --------------------

NO_LABEL = "none"


@dataclass
class TileLabels:
    image: Image.Image
    cell_shapes: list  # 4 cells in reading order: shape kind or NO_LABEL
    cell_colours: list  # 4 cells: colour name or NO_LABEL
    word: str  # the word drawn (lower case) or NO_LABEL


def make_tile_labels(seed: int, word_fraction: float = 0.25) -> TileLabels:
    """An image like the question images (1-3 shapes in cells, or, with probability
    ``word_fraction``, a word) with what each of the 2x2 cells holds: the targets of
    ``train.warm_up_vision``."""
    rng = random.Random(seed)
    kind = "word" if rng.random() < word_fraction else "count"
    image, shapes, word = make_image(rng, kind)
    cell_shapes, cell_colours = [NO_LABEL] * 4, [NO_LABEL] * 4
    for shape in shapes:
        cell = _cell_of(shape, image.width, image.height)
        cell_shapes[cell], cell_colours[cell] = shape.kind, shape.colour
    return TileLabels(image, cell_shapes, cell_colours, word.lower() if word else NO_LABEL)
