"""kawhi-tiny's task and answer check: planted ground truth read back from the pixels."""

from __future__ import annotations

import random

import numpy as np
import pytest
from kawhi.tiny.responses import (
    ANSWER,
    DESCRIBE_PROMPT,
    INDEPENDENT,
    READS,
    answer_reward,
    description,
    extract_answer,
    make_response,
    paired_responses,
)
from kawhi.tiny.task import COLOURS, KINDS, SPLITS, answer_set, chance, make_item, place_of, tiny_items


def test_items_are_reproducible_and_splits_differ():
    a = tiny_items(3, seed=5, split="val")
    b = tiny_items(3, seed=5, split="val")
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    others = {s: [x.to_dict() for x in tiny_items(3, seed=5, split=s)] for s in SPLITS}
    assert others["train"] != others["val"] != others["test"]
    assert [x.to_dict() for x in tiny_items(3, seed=6, split="val")] != others["val"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_boxes_hold_the_objects_colour_and_nothing_else_is_coloured(kind):
    for index in range(20):
        item = make_item(kind, index, seed=1)
        pixels = np.asarray(item.image).astype(int)
        inside = np.zeros(pixels.shape[:2], bool)
        for obj in item.objects:
            x0, y0, x1, y1 = obj.box
            inside[y0:y1, x0:x1] = True
            patch = pixels[y0:y1, x0:x1].reshape(-1, 3)
            share = (np.abs(patch - COLOURS[obj.colour]).sum(1) < 30).mean()
            assert share > 0.4, (kind, index, obj)  # a triangle fills half its box
        assert (pixels[~inside] == 255).all()  # white outside every box
        assert item.answer in item.candidates == answer_set(kind)
        assert item.asked and all(0 <= i < len(item.objects) for i in item.asked)


def test_answers_follow_from_the_objects():
    for index in range(30):
        tallest = make_item("bar_tallest", index)
        assert tallest.answer == max(tallest.objects, key=lambda o: o.value).colour
        assert tallest.objects[tallest.asked[0]].value == max(o.value for o in tallest.objects)
        count = make_item("shape_count", index)
        assert count.answer == str(len(count.objects)) and count.asked == tuple(range(len(count.objects)))
        value = make_item("bar_value", index)
        asked = value.objects[value.asked[0]]
        assert value.answer == str(asked.value) and asked.colour in value.question
        x0, y0, x1, y1 = asked.box
        assert y1 - y0 == asked.value * 28 - 6
        colour = make_item("shape_colour", index)
        assert colour.answer == colour.objects[colour.asked[0]].colour
        assert colour.objects[colour.asked[0]].kind in colour.question


def test_chance_is_one_over_the_answer_set():
    assert chance("shape_colour") == pytest.approx(1 / 6)
    assert chance("bar_count") == pytest.approx(1 / 3)
    assert chance("shape_place") == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="unknown kind"):
        chance("nope")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 28"):
        make_item("bar_count", 0, size=100)
    with pytest.raises(ValueError, match="unknown split"):
        make_item("bar_count", 0, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        tiny_items(0)


def test_responses_have_roles_and_wrong_ones_lose_the_reward():
    rng = random.Random(0)
    for item in tiny_items(5, seed=2):
        for n in (2, 3, 4):
            right = make_response(item, rng, correct=True, paragraphs=n)
            wrong = make_response(item, rng, correct=False, paragraphs=n)
            for response in (right, wrong):
                assert len(response.paragraphs) == n and response.roles[-1] == ANSWER
                assert response.roles.count(READS) == 1 and response.roles.count(INDEPENDENT) == n - 2
                assert response.text.split("\n\n") == list(response.paragraphs)
            assert answer_reward(right.text, item) == 1.0
            assert answer_reward(wrong.text, item) == 0.0 and wrong.answer != item.answer
            assert wrong.answer in wrong.paragraphs[wrong.roles.index(READS)] or item.kind == "shape_place"


def test_paired_responses_swap_only_the_order():
    item = make_item("shape_colour", 4)
    first, second = paired_responses(item)
    assert first.roles == (READS, INDEPENDENT, ANSWER) and second.roles == (INDEPENDENT, READS, ANSWER)
    assert first.paragraphs[0] == second.paragraphs[1] and first.paragraphs[1] == second.paragraphs[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("The circle is red.\n\nAnswer: red", "red"),
    ("Answer: top left", "top left"),
    ("Answer: red\n\n", "red"),
    ("Answer: red.", "red."),  # exact match: the reward then says 0
    ("Answer red", None),
    ("answer: red", None),
    ("Answer: red\n\nSo that is it.", None),  # the answer must be the last paragraph
    ("Answer: red\nblue", None),
    ("", None),
])
def test_extract_answer_is_exact(text, expected):
    assert extract_answer(text) == expected
    assert answer_reward(text, "red") == (1.0 if expected == "red" else 0.0)


def test_the_fewest_objects_curriculum_changes_only_the_count():
    for kind in KINDS:
        plain = [make_item(kind, i) for i in range(12)]
        fewest = [make_item(kind, i, fewest_objects=True) for i in range(12)]
        assert {len(it.objects) for it in fewest} == {1 if kind.startswith("shape") else 2}
        assert len({len(it.objects) for it in plain}) > 1  # the default draws the count
        assert all(it.answer in answer_set(kind) for it in fewest)
    assert [make_item("bar_value", 3).question] == [make_item("bar_value", 3, fewest_objects=False).question]


@pytest.mark.parametrize("kind", ["shape_colour", "bar_value"])
def test_a_description_reads_every_object_once_in_reading_order(kind):
    for index in range(40):
        item = make_item(kind, index, split="val")
        paragraphs = description(item).split("\n")
        assert len(paragraphs) == len(item.objects)
        size = item.image.size[0]
        if kind == "bar_value":
            bars = sorted(item.objects, key=lambda o: o.box[0])  # left to right, from the pixels
            assert paragraphs == [f"The {b.colour} {b.value}" for b in bars]
        else:
            shapes = sorted(item.objects, key=lambda o: (o.box[1] // 28, o.box[0] // 28))  # rows, then columns
            assert paragraphs == [f"The {s.kind} {s.colour} {place_of(s, size)}"
                                  for s in shapes]


def test_description_rows_take_the_describe_prompt_and_leave_the_other_rows_alone():
    from kawhi.engine.engine import Engine
    from kawhi.tiny.model import encode_row, training_response, training_row

    reference = Engine.load().model
    items = [make_item(k, i) for i in range(4) for k in KINDS]
    plain, described = random.Random(3), random.Random(3)
    for item in items:  # describe_share 0 draws the same responses as before the option existed
        assert training_row(reference, item, described, 0.4).targets == encode_row(
            reference, item, training_response(item, plain, 0.4)).targets
    row = training_row(reference, items[0], random.Random(0), 0.4, describe_share=1.0)
    assert row.targets[:-1] == reference.tokenize(description(items[0])).token_ids
    question = reference.tokenizer.decode(row.prompt.input_ids)
    assert DESCRIBE_PROMPT in question and items[0].question not in question
