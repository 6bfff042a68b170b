"""Vision-critical head presets (docs/method.md §3), keyed by model.

Each set was found offline by masking one head index in every decoder layer and
measuring the drop on a visual benchmark (the paper: MME). A model without a published
set falls back to all heads with a warning; run the ablation for it (see docs/method.md §3).
"""

from __future__ import annotations

# Keys are lower-case substrings matched against the model's name or path; the first
# match wins, so the more specific names come first.
PUBLISHED_HEADS: dict[str, tuple[int, ...]] = {
    "qwen2.5-vl-7b": (0, 1, 3, 22, 23, 24, 25, 26, 27),
    "qwen3-vl-4b": (2, 3, 4, 12, 13, 19, 25, 27),
}


def preset_heads(model_name: str, num_heads: int) -> tuple[int, ...] | None:
    """The published head set for ``model_name``, or None when there is none.

    A preset whose indices do not fit ``num_heads`` (a different model that happens to
    share the name) is not used.
    """
    name = model_name.lower().replace("_", "-")
    for key, heads in PUBLISHED_HEADS.items():
        if key in name and max(heads) < num_heads:
            return heads
    return None
