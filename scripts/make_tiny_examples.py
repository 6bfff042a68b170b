#!/usr/bin/env python3
"""Write examples/tiny_rollouts.jsonl and its images: kawhi-tiny task groups for the embedded model.

Deterministic (the task's seeded items, a fixed response generator), so running it twice gives
byte-identical files. Each group holds right and wrong multi-paragraph responses with their
0/1 rewards from the task's answer check (kawhi.tiny.responses.answer_reward):

* tiny-shape-colour - "What colour is the <shape>?" on a three-shape scene, G=4;
* tiny-bar-tallest  - "Which bar is the tallest?" on a chart, G=4.

    python3 scripts/make_tiny_examples.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kawhi.tiny.responses import answer_reward, make_response
from kawhi.tiny.task import make_item

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def first_item(kind: str, objects: int):
    """The first test-split item of ``kind`` with at least ``objects`` objects."""
    index = 0
    while len(make_item(kind, index, split="test").objects) < objects:
        index += 1
    return make_item(kind, index, split="test")


def main() -> None:
    (EXAMPLES / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for group_id, kind, objects in (("tiny-shape-colour", "shape_colour", 3), ("tiny-bar-tallest", "bar_tallest", 3)):
        item = first_item(kind, objects)
        name = f"images/{group_id}.png"
        item.image.save(EXAMPLES / name)
        rng = random.Random(group_id)
        responses = [make_response(item, rng, correct=c, paragraphs=n)
                     for c, n in ((True, 3), (False, 3), (True, 4), (False, 2))]
        lines.append({"id": group_id, "image": {"path": name}, "prompt": item.question,
                      "responses": [{"text": r.text, "reward": answer_reward(r.text, item)} for r in responses]})
    path = EXAMPLES / "tiny_rollouts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {path} ({len(lines)} groups)")


if __name__ == "__main__":
    main()
