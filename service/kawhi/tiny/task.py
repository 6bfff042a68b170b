"""The kawhi-tiny visual task: seeded scenes of shapes and bar charts with exact ground truth.

An image is a grid of square cells, one cell per LLM visual token of a Qwen2/2.5-VL model
(28 x 28 px), ``size // 28`` cells a side (4 x 4 at the default 112 px). A **shape scene**
holds 1-4 shapes of different kinds (circle, square, triangle, diamond) and different
colours, each inside one cell with a few pixels of jitter. A **bar chart** holds 2-4
bars of different colours and different heights (1 to ``cells`` cells), each in its own
column, standing on the bottom edge.

Question kinds (:data:`KINDS`) and their closed answer sets: the chance accuracy of a
kind is one over the size of its answer set (a guess that knows the set, not the image).

Every item carries the pixel boxes (x0, y0, x1, y1, end-exclusive) of every object and the
indices of the object(s) the question is about. Items are reproducible from
(kind, n, seed, size, split): each item's generator is seeded by a string naming all of
them, so the same call gives the same items on every machine and Python version, and
the splits (:data:`SPLITS`) never share a generator seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

CELL = 28  # px per visual token of Qwen2/2.5-VL (patch 14, spatial merge 2)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (240, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = ("top left", "top right", "bottom left", "bottom right")
SPLITS = ("train", "val", "test")
DEFAULT_SIZE = 112


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: ``kind`` is a shape name or "bar"; ``box`` in pixels, end-exclusive;
    ``cells``: the (row, col) grid cells it stands in; ``value``: a bar's height in cells."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    cells: tuple[tuple[int, int], ...]
    value: int | None = None


@dataclass(frozen=True)
class TinyItem:
    """One question about one image, with its answer and ground truth."""

    kind: str
    image: Image.Image = field(repr=False)
    question: str
    answer: str
    objects: tuple[SceneObject, ...]
    asked: tuple[int, ...]  # indices into objects of what the question is about
    split: str
    seed: int
    index: int

    @property
    def candidates(self) -> tuple[str, ...]:
        return answer_set(self.kind, self.image.size[0] // CELL)

    @property
    def asked_boxes(self) -> list[tuple[int, int, int, int]]:
        return [self.objects[i].box for i in self.asked]

    def to_dict(self) -> dict:
        """JSON-ready, without the image."""
        return {"kind": self.kind, "question": self.question, "answer": self.answer, "split": self.split,
                "seed": self.seed, "index": self.index, "asked": list(self.asked),
                "objects": [{"kind": o.kind, "colour": o.colour, "box": list(o.box), "value": o.value}
                            for o in self.objects]}


# ------------------------------------------------------------------ drawing


def _shape_object(draw: ImageDraw.ImageDraw, rng: random.Random, shape: str, colour: str,
                  cell: tuple[int, int]) -> SceneObject:
    row, col = cell
    side = 20
    x0 = col * CELL + (CELL - side) // 2 + rng.randint(-2, 2)
    y0 = row * CELL + (CELL - side) // 2 + rng.randint(-2, 2)
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL's boxes are inclusive
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)
    return SceneObject(shape, colour, (x0, y0, x1 + 1, y1 + 1), (cell,))


def shape_counts() -> tuple[int, int]:
    """The fewest and the most shapes a scene holds."""
    return 1, len(SHAPES)


def bar_counts(cells: int) -> tuple[int, int]:
    """The fewest and the most bars a chart of ``cells`` columns holds."""
    return 2, min(4, cells)


def shape_scene(rng: random.Random, size: int, fewest: bool = False) -> tuple[Image.Image, list[SceneObject]]:
    """1-4 shapes of different kinds and colours, each in its own cell (``fewest``: one shape)."""
    cells = size // CELL
    low, high = shape_counts()
    count = low if fewest else rng.randint(low, high)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(sorted(COLOURS), count)
    places = rng.sample([(r, c) for r in range(cells) for c in range(cells)], count)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    objects = [_shape_object(draw, rng, s, c, p) for s, c, p in zip(shapes, colours, places)]
    return image, objects


def bar_chart(rng: random.Random, size: int, fewest: bool = False) -> tuple[Image.Image, list[SceneObject]]:
    """2-4 bars of different colours and heights (1..cells cells), one per column, left to right
    (``fewest``: two bars)."""
    cells = size // CELL
    low, high = bar_counts(cells)
    count = low if fewest else rng.randint(low, high)
    columns = sorted(rng.sample(range(cells), count))
    values = rng.sample(range(1, cells + 1), count)
    colours = rng.sample(sorted(COLOURS), count)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    objects = []
    for col, value, colour in zip(columns, values, colours):
        x0, x1 = col * CELL + 6, col * CELL + 22
        y0, y1 = size - value * CELL + 4, size - 2
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[colour])
        objects.append(SceneObject("bar", colour, (x0, y0, x1, y1),
                                   tuple((r, col) for r in range(cells - value, cells)), value))
    return image, objects


def place_of(obj: SceneObject, size: int) -> str:
    """The quadrant ("top left", ...) holding the centre of ``obj``."""
    x0, y0, x1, y1 = obj.box
    top = (y0 + y1) / 2 < size / 2
    left = (x0 + x1) / 2 < size / 2
    return f"{'top' if top else 'bottom'} {'left' if left else 'right'}"


# ------------------------------------------------------------------ questions


def _shape_colour(rng: random.Random, size: int, fewest: bool = False):
    image, objects = shape_scene(rng, size, fewest)
    i = rng.randrange(len(objects))
    return image, f"What colour is the {objects[i].kind}?", objects[i].colour, objects, (i,)


def _shape_place(rng: random.Random, size: int, fewest: bool = False):
    image, objects = shape_scene(rng, size, fewest)
    i = rng.randrange(len(objects))
    return image, f"Where is the {objects[i].kind}?", place_of(objects[i], size), objects, (i,)


def _shape_count(rng: random.Random, size: int, fewest: bool = False):
    image, objects = shape_scene(rng, size, fewest)
    return image, "How many shapes are there?", str(len(objects)), objects, tuple(range(len(objects)))


def _bar_tallest(rng: random.Random, size: int, fewest: bool = False):
    image, objects = bar_chart(rng, size, fewest)
    i = max(range(len(objects)), key=lambda j: objects[j].value)
    return image, "Which bar is the tallest?", objects[i].colour, objects, (i,)


def _bar_count(rng: random.Random, size: int, fewest: bool = False):
    image, objects = bar_chart(rng, size, fewest)
    return image, "How many bars are there?", str(len(objects)), objects, tuple(range(len(objects)))


def _bar_value(rng: random.Random, size: int, fewest: bool = False):
    image, objects = bar_chart(rng, size, fewest)
    i = rng.randrange(len(objects))
    return image, f"How tall is the {objects[i].colour} bar?", str(objects[i].value), objects, (i,)


KINDS = {
    "shape_colour": _shape_colour,
    "shape_place": _shape_place,
    "shape_count": _shape_count,
    "bar_tallest": _bar_tallest,
    "bar_count": _bar_count,
    "bar_value": _bar_value,
}


def answer_set(kind: str, cells: int = DEFAULT_SIZE // CELL) -> tuple[str, ...]:
    """Every answer ``kind`` can have on a ``cells`` x ``cells`` grid."""
    if kind in ("shape_colour", "bar_tallest"):
        return tuple(sorted(COLOURS))
    if kind == "shape_place":
        return PLACES
    if kind == "shape_count":
        low, high = shape_counts()
        return tuple(str(n) for n in range(low, high + 1))
    if kind == "bar_count":
        low, high = bar_counts(cells)
        return tuple(str(n) for n in range(low, high + 1))
    if kind == "bar_value":
        return tuple(str(n) for n in range(1, cells + 1))
    raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")


def chance(kind: str, size: int = DEFAULT_SIZE) -> float:
    """Accuracy of a uniform guess from the kind's answer set."""
    return 1.0 / len(answer_set(kind, size // CELL))


def make_item(kind: str, index: int, seed: int = 0, size: int = DEFAULT_SIZE, split: str = "train",
              fewest_objects: bool = False) -> TinyItem:
    """Item ``index`` of (kind, seed, size, split): the same on every machine.

    ``fewest_objects``: a scene with the fewest objects its kind allows (one shape, two bars),
    for a training curriculum; held-out splits use the default.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if size < 2 * CELL or size % CELL:
        raise ValueError(f"size must be a multiple of {CELL} and at least {2 * CELL}, got {size}")
    rng = random.Random(f"kawhi-tiny/{split}/{kind}/{seed}/{size}/{index}")
    image, question, answer, objects, asked = KINDS[kind](rng, size, fewest_objects)
    return TinyItem(kind, image, question, answer, tuple(objects), asked, split, seed, index)


def tiny_items(n: int, seed: int = 0, size: int = DEFAULT_SIZE, split: str = "test",
               kinds: tuple[str, ...] | list[str] | None = None) -> list[TinyItem]:
    """``n`` items per kind of ``kinds`` (default: all), kind by kind."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [make_item(kind, i, seed, size, split) for kind in (kinds or KINDS) for i in range(n)]
