"""A small labelled synthetic visual QA set: charts and geometry with known answers.

Each item is drawn from a seeded generator, so a set is reproducible from
(n, seed, size). Every answer is one short word or number that can only be read off
the image; the question alone does not give it away (each kind has several equally
likely answers). Good enough for the head test's sanity and for the demo; for a
real model prefer a few hundred items of the kind of images you train on.

    kawhi heads synth -o vqa/ --items 64        # vqa/vqa.jsonl + vqa/images/*.png
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kawhi.heads.discover import VQAItem

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 140, 20)}
LETTERS = "ABCDE"


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _bars(rng: random.Random, size: int) -> tuple[Image.Image, list[int]]:
    count = rng.randint(3, 5)
    values = rng.sample(range(1, 10), count)
    image, draw = _canvas(size)
    left, bottom, top = size * 0.15, size * 0.85, size * 0.1
    unit = (bottom - top) / 10
    font = ImageFont.load_default()
    for v in range(0, 11, 2):  # y axis with ticks
        y = bottom - v * unit
        draw.line([(left - 4, y), (size * 0.95, y)], fill=(220, 220, 220))
        draw.text((2, y - 5), str(v), fill=(0, 0, 0), font=font)
    draw.line([(left, top), (left, bottom), (size * 0.95, bottom)], fill=(0, 0, 0), width=2)
    width = (size * 0.8) / count
    for i, v in enumerate(values):
        x0 = left + i * width + width * 0.2
        draw.rectangle([x0, bottom - v * unit, x0 + width * 0.6, bottom], fill=(60, 110, 200))
        draw.text((x0 + width * 0.25, bottom + 4), LETTERS[i], fill=(0, 0, 0), font=font)
    return image, values


def _chart_count(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    image, values = _bars(rng, size)
    return image, "How many bars are in the chart? Answer with a number.", str(len(values))


def _chart_tallest(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    image, values = _bars(rng, size)
    return image, "Which bar is the tallest? Answer with its letter.", LETTERS[values.index(max(values))]


def _chart_value(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    image, values = _bars(rng, size)
    i = rng.randrange(len(values))
    return image, f"What is the value of bar {LETTERS[i]}? Answer with a number.", str(values[i])


def _polygon(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    sides = rng.randint(3, 8)
    image, draw = _canvas(size)
    cx, cy, r = size / 2 + rng.uniform(-10, 10), size / 2 + rng.uniform(-10, 10), size * rng.uniform(0.25, 0.4)
    phase = rng.uniform(0, 2 * math.pi)
    points = [(cx + r * math.cos(phase + 2 * math.pi * k / sides), cy + r * math.sin(phase + 2 * math.pi * k / sides))
              for k in range(sides)]
    draw.polygon(points, outline=(0, 0, 0), fill=(200, 220, 255), width=3)
    return image, "How many sides does the polygon have? Answer with a number.", str(sides)


def _circle_color(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    name = rng.choice(sorted(COLORS))
    image, draw = _canvas(size)
    r = size * rng.uniform(0.2, 0.35)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[name], outline=(0, 0, 0))
    return image, "What color is the circle? Answer with one word.", name


def _circle_count(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    count = rng.randint(1, 6)
    image, draw = _canvas(size)
    r = size * 0.07
    placed: list[tuple[float, float]] = []
    while len(placed) < count:
        x, y = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if all((x - a) ** 2 + (y - b) ** 2 > (2.3 * r) ** 2 for a, b in placed):
            placed.append((x, y))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(30, 30, 30))
    return image, "How many circles are in the image? Answer with a number.", str(count)


KINDS: dict[str, Callable[[random.Random, int], tuple[Image.Image, str, str]]] = {
    "chart_count": _chart_count,
    "chart_tallest": _chart_tallest,
    "chart_value": _chart_value,
    "polygon_sides": _polygon,
    "circle_color": _circle_color,
    "circle_count": _circle_count,
}


def synthetic_vqa(n: int, seed: int = 0, size: int = 224) -> list[VQAItem]:
    """``n`` items cycling through :data:`KINDS`, reproducible from (n, seed, size)."""
    if n < 1 or size < 56:
        raise ValueError("need n >= 1 and size >= 56")
    rng = random.Random(seed)
    kinds = list(KINDS.values())
    return [VQAItem(*kinds[i % len(kinds)](rng, size)) for i in range(n)]


def tiny_vqa(n: int, seed: int = 0, split: str = "val") -> list[VQAItem]:
    """``n`` kawhi-tiny items (kawhi.tiny.task, kinds in turn) with the gold response the
    embedded kawhi-tiny model was trained to give: ``Answer: X``."""
    from kawhi.tiny.task import KINDS, make_item

    if n < 1:
        raise ValueError("need n >= 1")
    kinds = list(KINDS)
    items = [make_item(kinds[i % len(kinds)], i // len(kinds), seed=seed, split=split) for i in range(n)]
    return [VQAItem(item.image, item.question, f"Answer: {item.answer}") for item in items]


SYNTHETIC_TASKS = ("charts", "tiny")


def synthetic_items(task: str, n: int, seed: int = 0, size: int = 224) -> list[VQAItem]:
    """The synthetic set ``task``: "charts" (:func:`synthetic_vqa`, one-word answers) or
    "tiny" (:func:`tiny_vqa`, 112 px, ``Answer: X``; ``size`` is not used)."""
    if task == "tiny":
        return tiny_vqa(n, seed)
    if task == "charts":
        return synthetic_vqa(n, seed, size)
    raise ValueError(f"unknown synthetic task {task!r}; use one of {', '.join(SYNTHETIC_TASKS)}")


def write_synthetic_vqa(folder: str | Path, n: int, seed: int = 0, size: int = 224, task: str = "charts") -> Path:
    """Write ``folder``/vqa.jsonl and ``folder``/images/NNNN.png; returns the JSONL path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "vqa.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i, item in enumerate(synthetic_items(task, n, seed, size)):
            name = f"images/{i:04d}.png"
            item.image.save(folder / name)
            out.write(json.dumps({"image": {"path": name}, "question": item.question, "answer": item.answer}) + "\n")
    return path
