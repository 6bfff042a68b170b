"""Responses of the kind an RL trainer samples for a kawhi-tiny item, and the answer check.

A response is 2-4 paragraphs separated by a blank line: an image-reading paragraph
("The circle is in the top left of the image, and it is red."), zero to two
image-independent ones (the question restated, generic reasoning) and, last,
``Answer: X``. A wrong response reads the image wrongly and answers accordingly, so a
group holds a mix of rewards. Every paragraph carries its role, which the evaluation
uses to compare the alpha of image-reading paragraphs with image-independent ones.

:func:`answer_reward` is what an RL reward calls: 1.0 when the response's last
paragraph is exactly ``Answer: <the item's answer>``, else 0.0.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kawhi.tiny.task import TinyItem, place_of

READS = "reads_image"
INDEPENDENT = "image_independent"
ANSWER = "answer"
_ANSWER_LINE = re.compile(r"Answer: (\S(?:.*\S)?)")

_RESTATE = {
    "shape_colour": "The question asks for the colour of the {shape}, in one word.",
    "shape_place": "The question asks where the {shape} is, as a corner of the image.",
    "shape_count": "The question asks how many shapes there are, as a number.",
    "bar_tallest": "The question asks which bar is the tallest, by its colour.",
    "bar_count": "The question asks how many bars there are, as a number.",
    "bar_value": "The question asks how tall the {colour} bar is, as a number.",
}
GENERIC = (
    "So the answer follows from that.",
    "Nothing else in the question changes this.",
    "I will give the answer in the requested form.",
)


@dataclass(frozen=True)
class Response:
    """A response's paragraphs, each with its role; ``text`` joins them with blank lines."""

    paragraphs: tuple[str, ...]
    roles: tuple[str, ...]
    answer: str
    correct: bool

    @property
    def text(self) -> str:
        return "\n\n".join(self.paragraphs)


def reading_paragraph(item: TinyItem, answer: str) -> str:
    """The image-reading sentence that leads to ``answer`` (the true one or a wrong one)."""
    size = item.image.size[0]
    asked = item.objects[item.asked[0]]
    if item.kind == "shape_colour":
        return f"The {asked.kind} is in the {place_of(asked, size)} of the image, and it is {answer}."
    if item.kind == "shape_place":
        return f"The {asked.kind} is {asked.colour}, and it is in the {answer} of the image."
    if item.kind == "shape_count":
        return f"Counting the shapes in the image gives {answer}."
    if item.kind == "bar_tallest":
        return f"The {answer} bar reaches higher than every other bar in the chart."
    if item.kind == "bar_count":
        return f"The chart in the image shows {answer} bars."
    if item.kind == "bar_value":
        return f"The {asked.colour} bar in the chart reaches a height of {answer}."
    raise ValueError(f"unknown kind {item.kind!r}")


DESCRIBE_PROMPT = "Describe the image."


def description(item: TinyItem) -> str:
    """Every object of the item's image, one line each: what a model trained on
    ``DESCRIBE_PROMPT`` says (training data only: these lines bind the colour, place and
    height of every object, not just the asked one's).

    Shapes in reading order (row, then column) as "The triangle yellow top left"; bars left
    to right as "The red 3" (the leading word keeps each name the same token as in the
    questions). The property is the very next token after its object's name, so the
    lookup from a name to its visual token is learnt in one hop (the name's own query),
    before a question needs it across the prompt (docs/tiny.md: with sentences the answer
    position attended to every visual token alike after 2,000 steps).
    """
    size = item.image.size[0]
    lines = []
    for obj in sorted(item.objects, key=lambda o: (o.cells[-1][1], 0) if o.kind == "bar" else o.cells[0]):
        if obj.kind == "bar":
            lines.append(f"The {obj.colour} {obj.value}")
        else:
            lines.append(f"The {obj.kind} {obj.colour} {place_of(obj, size)}")
    return "\n".join(lines)


def restating_paragraph(item: TinyItem) -> str:
    """The question in other words: the same whatever the image shows."""
    asked = item.objects[item.asked[0]]
    return _RESTATE[item.kind].format(shape=asked.kind, colour=asked.colour)


def wrong_answer(item: TinyItem, rng: random.Random) -> str:
    return rng.choice([a for a in item.candidates if a != item.answer])


def make_response(item: TinyItem, rng: random.Random, correct: bool = True, paragraphs: int | None = None,
                  reading_first: bool | None = None) -> Response:
    """A response of ``paragraphs`` (2-4; random when None) paragraphs ending in ``Answer: X``.

    With 3 paragraphs the image-independent one comes before or after the reading one
    (``reading_first``; random when None); with 4 the restatement opens and a generic
    sentence follows the reading.
    """
    n = paragraphs if paragraphs is not None else rng.randint(2, 4)
    if n not in (2, 3, 4):
        raise ValueError(f"a response has 2-4 paragraphs, got {n}")
    answer = item.answer if correct else wrong_answer(item, rng)
    body = [(reading_paragraph(item, answer), READS)]
    if n == 3:
        first = rng.random() < 0.5 if reading_first is None else reading_first
        other = (restating_paragraph(item), INDEPENDENT) if rng.random() < 0.5 else (rng.choice(GENERIC), INDEPENDENT)
        body = body + [other] if first else [other] + body
    elif n == 4:
        body = [(restating_paragraph(item), INDEPENDENT), *body, (rng.choice(GENERIC), INDEPENDENT)]
    body.append((f"Answer: {answer}", ANSWER))
    return Response(tuple(p for p, _ in body), tuple(r for _, r in body), answer, correct)


def paired_responses(item: TinyItem) -> tuple[Response, Response]:
    """The same two paragraphs (reading, restatement) in both orders, each followed by the answer:
    for measuring the content effect apart from the position effect."""
    reading, restating = reading_paragraph(item, item.answer), restating_paragraph(item)
    final = f"Answer: {item.answer}"
    return (Response((reading, restating, final), (READS, INDEPENDENT, ANSWER), item.answer, True),
            Response((restating, reading, final), (INDEPENDENT, READS, ANSWER), item.answer, True))


def extract_answer(text: str) -> str | None:
    """X when the last non-empty paragraph of ``text`` is exactly ``Answer: X`` (one line), else None."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        return None
    match = _ANSWER_LINE.fullmatch(paragraphs[-1])
    return match.group(1) if match else None


def answer_reward(text: str, answer: str | TinyItem) -> float:
    """1.0 when ``text`` ends in exactly ``Answer: <answer>``, else 0.0 (exact match, case included)."""
    gold = answer.answer if isinstance(answer, TinyItem) else answer
    return 1.0 if extract_answer(text) == gold else 0.0
