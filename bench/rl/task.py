"""The RL task: items (image, question, gold answer, kind), the chat prompt, the reward and the
response statistics the experiment reports.

A response is paragraphs separated by blank lines; the last one is ``Answer: X``. The reward
is exact match of that paragraph's answer with the gold answer (1.0 or 0.0): nothing for
format, nothing for length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_ANSWER = re.compile(r"^\s*Answer:\s*(.*?)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Item:
    image: Any  # PIL image
    question: str
    answer: str
    kind: str


def paragraphs(text: str) -> list[str]:
    """Non-empty blank-line-separated paragraphs of a response."""
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


def final_answer(text: str) -> str | None:
    """The X of a last paragraph ``Answer: X``; None when the response has no such paragraph."""
    parts = paragraphs(text)
    if not parts:
        return None
    match = _ANSWER.match(parts[-1])
    return match.group(1) if match else None


def is_correct(text: str, gold: str) -> bool:
    answer = final_answer(text)
    return answer is not None and answer.strip().lower() == gold.strip().lower()


def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list):
        content = completion[-1]["content"]
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return str(completion)


def exact_match_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """TRL reward function: 1.0 when the ``Answer:`` paragraph equals the gold answer, else 0.0."""
    return [float(is_correct(completion_text(c), gold)) for c, gold in zip(completions, answer, strict=True)]


def load_items(kinds: Sequence[str] | None, n: int, seed: int, size: int = 112) -> list[Item]:
    """``n`` items of the synthetic visual task, reproducible from (kinds, n, seed, size)."""
    from kawhi.heads.synthetic import KINDS, synthetic_vqa

    names = list(KINDS)
    items = [Item(it.image, it.question, it.answer, names[i % len(names)])
             for i, it in enumerate(synthetic_vqa(n * len(names), seed=seed, size=size))]
    if kinds:
        items = [it for it in items if it.kind in kinds]
    return items[:n]


def split_seeds() -> tuple[int, int]:
    """(train seed, held-out seed): disjoint item streams of the same generator."""
    return 1000, 2000


def default_models() -> tuple[Any, Any]:
    """(policy checkpoint, reference model folder or None for the embedded model)."""
    from kawhi.engine.engine import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR, None
