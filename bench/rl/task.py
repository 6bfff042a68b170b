"""The RL task: kawhi-tiny's items (docs/tiny.md; :mod:`kawhi.tiny.task`), the reward and the
response statistics the experiment reports.

A response is paragraphs separated by blank lines, the last one ``Answer: X``. The reward is
:func:`kawhi.tiny.responses.answer_reward`: 1.0 when the last paragraph is exactly
``Answer: <gold>``, else 0.0 (nothing for format, nothing for length).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kawhi.tiny.responses import answer_reward
from kawhi.tiny.task import TinyItem, tiny_items

TRAIN_SEED, HELDOUT_SEED = 0, 0  # splits differ by name ("train" / "test"): never the same generator seed


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs of a response, split as the answer check splits them (blank lines)."""
    return [p for p in text.split("\n\n") if p.strip()]


def completion_text(completion: Any) -> str:
    """TRL hands conversational completions as ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, list):
        content = completion[-1]["content"]
        if isinstance(content, list):
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    return str(completion)


def is_correct(text: str, gold: str) -> bool:
    return answer_reward(text, gold) == 1.0


def exact_match_reward(completions: Sequence[Any], answer: Sequence[str], **_: Any) -> list[float]:
    """TRL reward function: :func:`answer_reward` of each completion against its row's ``answer``."""
    return [answer_reward(completion_text(c), gold) for c, gold in zip(completions, answer, strict=True)]


def train_items(per_kind: int, kinds: Sequence[str] | None = None) -> list[TinyItem]:
    """The RL prompts: the task's train split, kinds interleaved so every step sees a mix."""
    by_kind = tiny_items(per_kind, seed=TRAIN_SEED, split="train", kinds=tuple(kinds) if kinds else None)
    n_kinds = len(by_kind) // per_kind
    return [by_kind[k * per_kind + i] for i in range(per_kind) for k in range(n_kinds)]


def heldout_items(per_kind: int, kinds: Sequence[str] | None = None) -> list[TinyItem]:
    """Held-out accuracy is measured on the task's test split (the trained model was validated on "val")."""
    return tiny_items(per_kind, seed=HELDOUT_SEED, split="test", kinds=tuple(kinds) if kinds else None)


POLICY_STEPS = 600  # scripts/train_tiny_model.py's own "short, imperfect policy"


def policy_checkpoint(cache: Path, log: Any = print) -> Path:
    """The RL policy: kawhi-tiny trained for only POLICY_STEPS steps (deterministic), built into
    ``cache`` by scripts/train_tiny_model.py the first time (a few minutes on 2 cores)."""
    import subprocess
    import sys

    folder = cache / f"rl-policy-{POLICY_STEPS}"
    if (folder / "model.safetensors").exists():
        return folder
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, str(repo / "scripts" / "train_tiny_model.py"), "--out", str(folder),
               "--steps", str(POLICY_STEPS), "--threads", "1", "--eval-every", str(POLICY_STEPS), "-q"]
    log("training the policy checkpoint once: " + " ".join(command[1:]))
    subprocess.run(command, check=True, cwd=repo)
    return folder
