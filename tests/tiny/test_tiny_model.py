"""The shipped kawhi-tiny model: the default with no --model, small, labelled, and it reads the image.

Planted ground truth: held-out (test split) items whose answers are known; the same
questions on a blank image are the control (the answer must come from the pixels).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kawhi.engine.engine import TINY_MODEL_DIR, TINY_MODEL_NAME, Engine
from kawhi.tiny.model import accuracy_by_kind
from kawhi.tiny.task import KINDS, TinyItem, chance, tiny_items
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.load()


def test_the_default_model_is_kawhi_tiny_with_its_card_and_heads(tiny_engine):
    info = tiny_engine.info()
    assert info["model"] == TINY_MODEL_NAME and info["is_demo"] is False
    card = info["model_card"]
    assert set(card["val_accuracy"]) == set(KINDS) == set(card["chance"])
    assert card["training_command"].startswith("python scripts/train_tiny_model.py")
    assert info["heads_source"].startswith("file:") and info["heads"] == info["preset_heads"]


def test_the_shipped_model_is_small():
    size = sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir())
    assert size < 8_000_000, size


def test_it_reads_the_answer_off_the_image_and_not_off_the_question(tiny_engine):
    items = tiny_items(12, seed=1, split="test")
    seen = accuracy_by_kind(tiny_engine.model, items)
    blank = [TinyItem(i.kind, Image.new("RGB", i.image.size, (255, 255, 255)), i.question, i.answer, i.objects,
                      i.asked, i.split, i.seed, i.index) for i in items]
    blind = accuracy_by_kind(tiny_engine.model, blank)
    mean_seen = sum(seen.values()) / len(seen)
    mean_blind = sum(blind.values()) / len(blind)
    # what the shipped 3000-step model reaches (docs/tiny.md): the counting kinds, read off
    # the pixels; the binding kinds (colour, place, tallest, value) stay near chance
    assert seen["shape_count"] >= 0.8 and seen["bar_count"] >= 0.8, seen
    assert blind["shape_count"] <= chance("shape_count") + 0.35 and blind["bar_count"] <= chance("bar_count") + 0.35, blind
    assert mean_blind < mean_seen - 0.15, (seen, blind)


def test_the_training_script_runs_and_writes_a_loadable_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tiny_model.py"), "--out", str(tmp_path),
                          "--steps", "2", "--batch", "2", "--eval-every", "2", "--eval-items", "1", "--save-every", "1",
                          "-q"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and set(log[-1]["val_accuracy"]) == set(KINDS)
    engine = Engine.load(tmp_path / "checkpoints" / "step_00001")
    assert engine.model_card["steps"] == 1 and not engine.is_demo


def test_a_continued_run_starts_from_the_weights_and_items_where_the_first_stopped(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--steps", "1", "--batch", "2", "--eval-every", "1", "--eval-items", "1", "-q"]
    script = str(ROOT / "scripts" / "train_tiny_model.py")
    for out, extra in ((first, []), (second, ["--init", str(first), "--fewest-share", "1.0"])):
        run = subprocess.run([sys.executable, script, "--out", str(out), *common, *extra],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
    card = json.loads((second / "KAWHI_MODEL_CARD.json").read_text())
    assert card["steps"] == 1 and card["total_steps"] == 2
    assert card["continued_from"]["steps"] == 1 and "--fewest-share" in card["training_command"]
    before = Engine.load(first).model.model.state_dict()
    after = Engine.load(second).model.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed  # one more optimiser step moved the weights it started from


def test_the_lookup_probe_splits_attention_over_asked_other_and_background_tokens():
    """A smoke test of bench.tiny_lookup on the embedded model: per layer and head the three
    shares are attention weights of single tokens, so each lies in [0, 1] and the asked token
    plus one other object's plus one background token's cannot exceed the whole."""
    from bench.tiny_lookup import lookup_shares, reference_for

    reference = reference_for(TINY_MODEL_DIR)
    for at in ("answer", "name"):
        shares = lookup_shares(reference, at, items=6)
        assert shares["items"] >= 2
        layers = reference.model.config.text_config.num_hidden_layers
        heads = reference.model.config.text_config.num_attention_heads
        for key in ("asked", "other", "background"):
            assert len(shares[key]) == layers and all(len(row) == heads for row in shares[key])
        for a, o, b in zip(*(sum(shares[k], []) for k in ("asked", "other", "background"))):
            assert 0 <= a <= 1 and 0 <= o <= 1 and 0 <= b <= 1 and a + o + b <= 1 + 1e-6
