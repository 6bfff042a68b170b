"""Published vision-critical head sets (docs/method.md §3), keyed by model identity.

A set applies to a model with exactly this architecture and shape, whatever its
folder is called (a fine-tune of the same base gets the base's set; run
``kawhi heads discover`` if you suspect it moved). The shapes are those of the
models' published config.json files.
"""

from __future__ import annotations

from dataclasses import dataclass

from kawhi.heads.identity import ModelIdentity

PAPER = ("KAWHI (arXiv 2603.27375) §3.3, Fig. 3 and App. A: MME score drop when the head index is masked "
         "in every decoder layer")


@dataclass(frozen=True)
class PublishedHeads:
    name: str
    identity: ModelIdentity
    heads: tuple[int, ...]
    provenance: str


PUBLISHED: tuple[PublishedHeads, ...] = (
    PublishedHeads(
        "Qwen2.5-VL-7B-Instruct",
        ModelIdentity("qwen2_5_vl", num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, name_or_path="Qwen/Qwen2.5-VL-7B-Instruct"),
        (0, 1, 3, 22, 23, 24, 25, 26, 27),
        PAPER,
    ),
    PublishedHeads(
        "Qwen3-VL-4B-Instruct",
        ModelIdentity("qwen3_vl", num_hidden_layers=36, hidden_size=2560, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=151936, name_or_path="Qwen/Qwen3-VL-4B-Instruct"),
        (2, 3, 4, 12, 13, 19, 25, 27),
        PAPER,
    ),
)


def published_heads(identity: ModelIdentity) -> PublishedHeads | None:
    """The published set for a model of this architecture and shape, or None."""
    for preset in PUBLISHED:
        if preset.identity.shape() == identity.shape():
            return preset
    return None
