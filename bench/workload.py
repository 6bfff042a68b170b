"""Synthetic, deterministic rollout groups of exact sizes.

A group is one image (an example chart resized to ``image`` pixels), a fixed prompt and
``group_size`` responses of exactly ``response_tokens`` token ids each (random ids from
the tokenizer's ordinary vocabulary, seeded). Responses carry ``token_ids``, so the
engine scores exactly those tokens and every method sees identical sequences:
``[image + prompt prefix] + [response]``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "images" / "bar_chart.png"
PROMPT = "Which bar is the tallest, and by how much does it exceed the shortest one? Explain step by step."


@dataclass(frozen=True)
class GroupSpec:
    response_tokens: int = 256
    group_size: int = 4
    image: tuple[int, int] = (448, 336)  # (width, height) in pixels before the processor's resize
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"response_tokens": self.response_tokens, "group_size": self.group_size,
                "image": list(self.image), "seed": self.seed}


@dataclass
class Group:
    spec: GroupSpec
    png: bytes
    prompt: str
    responses: list[list[int]]
    rewards: list[float]
    sha256: str = ""
    _pil: Image.Image | None = field(default=None, repr=False)

    @property
    def image(self) -> Image.Image:
        if self._pil is None:
            self._pil = Image.open(io.BytesIO(self.png)).convert("RGB")
        return self._pil

    def api(self, group_id: str) -> dict[str, Any]:
        """The group as a docs/api.md rollout group (image inline as base64)."""
        return {
            "id": group_id,
            "image": {"data": base64.b64encode(self.png).decode()},
            "prompt": self.prompt,
            "responses": [{"text": "", "token_ids": ids, "reward": r} for ids, r in zip(self.responses, self.rewards)],
        }


_IMAGE_CACHE: dict[tuple[tuple[int, int], int], bytes] = {}


def image_png(size: tuple[int, int], seed: int = 0) -> bytes:
    """The example bar chart resized to ``size``, with a few seeded marks so that every seed
    is a different image (distinct sha256: no cache ever answers SGUF for another group)."""
    key = (tuple(size), seed)
    if key not in _IMAGE_CACHE:
        img = Image.open(EXAMPLE_IMAGE).convert("RGB").resize(tuple(size), Image.Resampling.BICUBIC)
        rng = random.Random(f"image:{seed}")
        draw = ImageDraw.Draw(img)
        w, h = img.size
        for _ in range(3):
            x, y = rng.randrange(w), rng.randrange(h)
            r = max(2, min(w, h) // 40)
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        _IMAGE_CACHE[key] = buf.getvalue()
    return _IMAGE_CACHE[key]


def ordinary_ids(tokenizer: Any) -> range:
    """Token ids that are not special/added tokens: contiguous after the specials (the demo
    tokenizer) or before them (Qwen's, whose added tokens follow the 151,643 BPE tokens)."""
    special = {int(i) for i in tokenizer.added_tokens_decoder}
    first = max(special) + 1 if special else 0
    if first >= len(tokenizer):
        return range(0, min(special))
    return range(first, len(tokenizer))


def make_group(reference: Any, spec: GroupSpec) -> Group:
    rng = random.Random(f"{spec.seed}:{spec.response_tokens}:{spec.group_size}:{spec.image}")
    ids = ordinary_ids(reference.tokenizer)
    responses = [[rng.randrange(ids.start, ids.stop) for _ in range(spec.response_tokens)]
                 for _ in range(spec.group_size)]
    rewards = [float(i % 2) for i in range(spec.group_size)]  # mixed rewards: non-zero advantages
    png = image_png(spec.image, spec.seed)
    return Group(spec, png, PROMPT, responses, rewards, hashlib.sha256(png).hexdigest())


def prefix_tokens(reference: Any, image: tuple[int, int]) -> int:
    """Length of the image + prompt prefix for an image of this size (after the processor's resize)."""
    resized, _ = reference.resize_image(Image.open(io.BytesIO(image_png(image))).convert("RGB"))
    return int(reference.encode_prompt(resized, prompt=PROMPT).input_ids.numel())


def visual_tokens(reference: Any, image: tuple[int, int]) -> int:
    w, h = reference.resized_size(*image)
    return (w // reference.patch_side) * (h // reference.patch_side)


def prepare(engine: Any, group: Group, options: dict | None = None) -> Any:
    """Engine.prepare for a bench group (validation, SGUF, tokens, advantages)."""
    from kawhi_client.schema import RolloutGroup

    config = engine.resolve_options(options)
    return engine.prepare(RolloutGroup.model_validate(group.api("g")), config, group.image,
                          image_sha256=group.sha256)


def request_body(groups: list[Group], prefix: str) -> bytes:
    """One POST /v1/reweight body holding ``groups`` with ids ``{prefix}-{i}`` (unique per request,
    so the server's idempotent result cache never answers for it)."""
    return json.dumps({"groups": [g.api(f"{prefix}-{i}") for i, g in enumerate(groups)]}).encode()
