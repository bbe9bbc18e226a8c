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
    """``count`` shapes of distinct kinds and colours in separate vertical bands (no overlap)."""
    kinds = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    band = width / count
    order = rng.sample(range(count), count)
    shapes = []
    for kind, colour, slot in zip(kinds, colours, order):
        size = int(min(band, height) * rng.uniform(0.45, 0.8))
        x0 = int(slot * band + rng.uniform(0, band - size))
        y0 = int(rng.uniform(0, height - size))
        shapes.append(_Shape(kind, colour, (x0, y0, x0 + size, y0 + size)))
    return shapes


def _background(rng: random.Random) -> tuple:
    grey = rng.randint(225, 255)
    return (grey, grey, rng.randint(225, 255))


def make_image(rng: random.Random, kind: str):
    """An image for a question kind: (image, shapes drawn, word drawn or None)."""
    width = rng.choice((96, 128, 160, 192))
    height = rng.choice((64, 96, 128))
    image = Image.new("RGB", (width, height), _background(rng))
    draw = ImageDraw.Draw(image)
    if kind == "word":
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=int(height * 0.55))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        x = rng.uniform(0, max(width - (right - left), 0)) - left
        y = rng.uniform(0, max(height - (bottom - top), 0)) - top
        draw.text((x, y), word, fill=COLOURS[rng.choice(("red", "blue", "green", "purple"))], font=font)
        return image, [], word
    count = rng.randint(1, 3) if kind in ("colour", "shape", "count") else rng.randint(2, 3)
    shapes = _place_shapes(rng, width, height, count)
    for shape in shapes:
        _draw_shape(draw, shape)
    return image, shapes, None


def _question(rng: random.Random, kind: str, shapes: list[_Shape], word) -> tuple[str, str]:
    if kind == "word":
        return "What word is written?", word.lower()
    if kind == "count":
        return "How many shapes are there?", COUNT_WORDS[len(shapes)]
    target = rng.choice(shapes)
    if kind == "colour":
        return f"What colour is the {target.kind}?", target.colour
    if kind == "shape":
        return f"What shape is {target.colour}?", target.kind
    # side: leftmost or rightmost shape among 2-3, asked by kind
    leftmost = min(shapes, key=lambda s: s.centre_x)
    rightmost = max(shapes, key=lambda s: s.centre_x)
    target = rng.choice((leftmost, rightmost))
    return f"Is the {target.kind} on the left or the right?", "left" if target is leftmost else "right"


def make_example(seed: int, kind: str | None = None) -> Example:
    """The example numbered ``seed`` (optionally of a given question kind)."""
    rng = random.Random(seed)
    kind = kind or rng.choice(QUESTION_KINDS)
    image, shapes, word = make_image(rng, kind)
    question, answer = _question(rng, kind, shapes, word)
    return Example(image, question, answer, kind)


def corpus_lines() -> list[str]:
    """Every question and answer the generator can produce (to train the tokenizer on)."""
    lines = ["What word is written?", "How many shapes are there?"]
    lines += [f"What colour is the {s}?" for s in SHAPES]
    lines += [f"What shape is {c}?" for c in COLOURS]
    lines += [f"Is the {s} on the left or the right?" for s in SHAPES]
    lines += list(COLOURS) + list(SHAPES) + [w.lower() for w in WORDS] + list(COUNT_WORDS.values())
    lines += ["left", "right", "User:", "Assistant:", "What is in this image?", "Describe the image."]
    return lines
