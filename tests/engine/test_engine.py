"""The engine end to end: determinism, docs/api.md shapes, every switch, every documented rule."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from kawhi.engine.config import MethodConfig
from kawhi.engine.engine import DEMO_MODEL_DIR, TINY_MODEL_DIR, Engine, EngineLimits, GroupError, OptionsError
from kawhi.engine.images import decode_image, sha256_hex
from kawhi.pipeline.local import LocalService
from kawhi_client.schema import RolloutGroup
from PIL import Image, ImageDraw
from tiny_models import ARCHITECTURES, tiny_reference

TEXTS = [
    "Looking at the image, the triangle has a right angle at C.\n\nSo AB is the hypotenuse.\n\nAnswer: 10.",
    "The circle intersects side AB.\n\nTherefore the answer is 7.\n\n",
    "Answer: 3.5 cm",
]


def png_bytes(width=224, height=168, draw=True) -> bytes:
    image = Image.new("RGB", (width, height), "white")
    if draw:
        d = ImageDraw.Draw(image)
        d.polygon([(30, 140), (190, 140), (30, 30)], outline="black", width=3)
        d.ellipse([120, 20, 200, 100], outline="blue", width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def group_dict(rewards=(1.0, 0.0, 1.0), texts=TEXTS, **extra) -> dict:
    return {"id": "g", "image": {"data": base64.b64encode(png_bytes()).decode()}, "prompt": "Find AB.",
            "responses": [{"text": t, "reward": r} for t, r in zip(texts, rewards)], **extra}


@pytest.fixture(scope="module")
def default_engine():
    """kawhi-tiny, what Engine.load() gives with no model (nothing here depends on its weights)."""
    return Engine.load(TINY_MODEL_DIR)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny_engine(request, tiny_model):
    return Engine(tiny_model(request.param))


def prepare(engine, raw, options=None):
    config = engine.resolve_options(options)
    group = RolloutGroup.model_validate(raw)
    data = base64.b64decode(group.image.data)
    return engine.prepare(group, config, decode_image(data), image_sha256=sha256_hex(data))


def check_api_shapes(result, group, config: MethodConfig):
    assert result.error is None
    rows, cols = result.grid
    assert set(result.key_tokens) <= set(result.selected_tokens) <= set(range(rows * cols))
    assert result.selected_tokens == sorted(result.selected_tokens)
    assert len(result.responses) == len(group["responses"])
    for response in result.responses:
        n = len(response.token_advantages)
        assert len(response.token_weights) == n
        np.testing.assert_allclose(response.token_advantages, np.multiply(response.advantage, response.token_weights))
        if n == 0:
            assert response.paragraphs == []
            continue
        assert response.paragraphs[0].token_start == 0 and response.paragraphs[-1].token_end == n
        for a, b in zip(response.paragraphs, response.paragraphs[1:]):
            assert a.token_end == b.token_start and a.char_end == b.char_start
        for p in response.paragraphs:
            assert -1.0 <= p.alpha <= 1.0
            if config.normalize == "none":
                assert config.w_min - 1e-12 <= p.weight <= config.w_max + 1e-12
            assert all(w == p.weight for w in response.token_weights[p.token_start:p.token_end])


def test_end_to_end_on_each_architecture_is_deterministic(tiny_engine):
    raw = group_dict()
    first = LocalService(tiny_engine).reweight([raw], {"seed": 3})[0]
    second = LocalService(tiny_engine).reweight([raw], {"seed": 3})[0]
    check_api_shapes(first, raw, tiny_engine.defaults)
    assert first.model_dump() == second.model_dump()
    assert len(first.responses[0].paragraphs) == 3
    assert len(first.responses[2].paragraphs) == 1
    # trailing delimiter makes no empty last paragraph
    assert len(first.responses[1].paragraphs) == 2


def test_group_advantages_follow_grpo(default_engine):
    result = LocalService(default_engine).reweight([group_dict(rewards=(1.0, 0.0, 1.0))])[0]
    rewards = np.array([1.0, 0.0, 1.0])
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose([r.advantage for r in result.responses], expected)
    check_api_shapes(result, group_dict(), default_engine.defaults)


def test_seed_changes_background_sample_only(default_engine):
    a = LocalService(default_engine).reweight([group_dict()], {"seed": 1})[0]
    b = LocalService(default_engine).reweight([group_dict()], {"seed": 2})[0]
    assert a.key_tokens == b.key_tokens
    assert a.selected_tokens != b.selected_tokens


def test_token_ids_are_scored_exactly(default_engine):
    tokenizer = default_engine.model.tokenizer
    ids = tokenizer("Step 1: the radius\n\nAnswer: 42.", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]
    raw = group_dict(rewards=(1.0, 0.0), texts=["ignored", "x"])
    raw["responses"][0]["token_ids"] = ids
    result = LocalService(default_engine).reweight([raw])[0]
    assert len(result.responses[0].token_advantages) == len(ids)
    assert len(result.responses[0].paragraphs) == 2


@pytest.mark.parametrize("options", [
    {"regions": "all"}, {"regions": "random"}, {"regions": "inverse"}, {"similarity": "key_key"},
    {"granularity": "sentence"}, {"granularity": "token"}, {"rope": "before"}, {"heads": "all"},
    {"heads": [0, 2]}, {"normalize": "mean"}, {"estimator": "drgrpo"}, {"estimator": "rloo"},
    {"std": "unbiased"}, {"temperature": 5.0, "smoothing": 0.5, "w_min": 0.2, "w_max": 0.8},
])
def test_every_switch_runs_and_keeps_the_contract(default_engine, options):
    raw = group_dict()
    config = default_engine.resolve_options(options)
    result = LocalService(default_engine).reweight([raw], options)[0]
    check_api_shapes(result, raw, config)


def test_switches_change_what_they_should(default_engine):
    def alphas(options):
        result = LocalService(default_engine).reweight([group_dict()], options)[0]
        return [p.alpha for p in result.responses[0].paragraphs]

    base = alphas({})
    preset = default_engine.info()["heads"]
    other_heads = [0] if preset != [0] else [1]
    for options in ({"rope": "before"}, {"similarity": "key_key"}, {"regions": "inverse"}, {"heads": other_heads}):
        assert not np.allclose(alphas(options), base), options
    all_regions = LocalService(default_engine).reweight([group_dict()], {"regions": "all"})[0]
    assert all_regions.selected_tokens == list(range(all_regions.grid[0] * all_regions.grid[1]))
    token_level = LocalService(default_engine).reweight([group_dict()], {"granularity": "token"})[0].responses[0]
    assert len(token_level.paragraphs) == len(token_level.token_weights)


def test_mean_normalisation_preserves_the_total_advantage(default_engine):
    response = LocalService(default_engine).reweight([group_dict()], {"normalize": "mean"})[0].responses[0]
    assert math.isclose(np.mean(response.token_weights), 1.0, rel_tol=1e-9)
    assert math.isclose(sum(response.token_advantages), response.advantage * len(response.token_weights),
                        rel_tol=1e-9)


def test_given_advantages_bypass_the_estimator(default_engine):
    raw = group_dict(advantages=[0.5, -1.0, 2.0])
    result = LocalService(default_engine).reweight([raw])[0]
    assert [r.advantage for r in result.responses] == [0.5, -1.0, 2.0]


def test_documented_rules_single_equal_empty(default_engine):
    single = LocalService(default_engine).reweight([group_dict(rewards=(1.0,), texts=TEXTS[:1])])[0]
    assert single.responses[0].advantage == 0.0
    equal = LocalService(default_engine).reweight([group_dict(rewards=(1.0, 1.0, 1.0))])[0]
    assert all(r.advantage == 0.0 and set(r.token_advantages) == {0.0} for r in equal.responses)
    empty = LocalService(default_engine).reweight([group_dict(rewards=(1.0, 0.0), texts=["", "Answer: 3."])])[0]
    assert empty.error is None
    assert empty.responses[0].token_advantages == [] and empty.responses[0].paragraphs == []


@pytest.mark.parametrize("mutate, pointer, status", [
    (lambda g: g["responses"][1].update(reward=float("nan")), "/responses/1/reward", 422),
    (lambda g: g["responses"][2].update(reward=float("inf")), "/responses/2/reward", 422),
    (lambda g: g["responses"][0].pop("reward"), "/responses/0/reward", 422),
    (lambda g: g.update(advantages=[1.0]), "/advantages", 422),
    (lambda g: g.update(advantages=[1.0, float("nan"), 0.0]), "/advantages/1", 422),
    (lambda g: g["responses"][0].update(token_ids=[1, 10**9]), "/responses/0/token_ids/1", 422),
    (lambda g: g["responses"][0].update(token_ids=[-1]), "/responses/0/token_ids/0", 422),
    (lambda g: g["responses"][0].update(token_ids=[6]), "/responses/0/token_ids/0", 422),  # <|image_pad|>
    (lambda g: g["responses"][0].update(text="word " * 20000), "/responses/0/text", 413),
    (lambda g: g.update(prompt=None, messages=[{"role": "user", "content": "no image here"}]), "/messages", 422),
])
def test_bad_groups_get_a_pointer(default_engine, mutate, pointer, status):
    """Through admit (counts and sizes) and the engine (what needs the model), as every front end."""
    raw = group_dict()
    mutate(raw)
    result = LocalService(default_engine).reweight([raw])[0]
    assert result.error is not None, pointer
    assert result.error.pointer == pointer and result.error.status == status


def test_given_estimator_needs_advantages(default_engine):
    with pytest.raises(GroupError) as info:
        prepare(default_engine, group_dict(), {"estimator": "given"})
    assert info.value.pointer == "/advantages"


@pytest.mark.parametrize("options, field", [
    ({"heads": [99]}, "heads"), ({"temperature": 0.0}, "temperature"), ({"w_min": 2.0}, "w_min"),
    ({"skip_ratio": 1.5}, "skip_ratio"), ({"bogus": 1}, "options"),
])
def test_bad_options_name_the_field(default_engine, options, field):
    with pytest.raises(OptionsError) as info:
        default_engine.resolve_options(options)
    assert info.value.field == field


def test_one_bad_group_does_not_hide_the_good_ones(default_engine):
    bad = group_dict()
    bad["responses"][0]["reward"] = float("nan")
    results = LocalService(default_engine).reweight([group_dict(), bad, {"not": "a group"}, group_dict()])
    assert [r.error is None for r in results] == [True, False, False, True]
    assert results[1].error.pointer == "/responses/0/reward"
    assert results[0].model_dump() == results[3].model_dump()


def test_region_cache_is_used(default_engine):
    class DictCache(dict):
        def set(self, key, value):
            self[key] = value

    cache = DictCache()
    raw = group_dict()
    config = default_engine.resolve_options(None)
    data = base64.b64decode(raw["image"]["data"])
    group = RolloutGroup.model_validate(raw)
    first = default_engine.prepare(group, config, decode_image(data), image_sha256=sha256_hex(data), region_cache=cache)
    assert len(cache) == 1
    key = next(iter(cache))
    cache[key] = {"grid": list(first.regions.grid), "key": [0], "selected": [0, 1]}
    second = default_engine.prepare(group, config, decode_image(data), image_sha256=sha256_hex(data), region_cache=cache)
    assert second.regions.selected.tolist() == [0, 1]


def test_info_labels_the_demo():
    # the demo itself is under test: its label, and no heads file (all heads)
    demo = Engine.load(DEMO_MODEL_DIR)
    info = demo.info()
    assert info["is_demo"] is True and "demo" in info["model"]
    assert info["heads"] == list(range(demo.model.num_heads))
    assert info["defaults"]["temperature"] == 0.1


def test_real_qwen_token_ids_from_a_trainer_are_scored_one_to_one():
    """Token ids as a Qwen2.5-VL trainer produces them (real vocabulary, <|im_end|>
    included, multi-byte characters split across tokens) get one advantage each, and
    paragraphs follow the text those ids decode to."""
    engine = Engine(tiny_reference("qwen2_5_vl", real_qwen_vocab=True))
    tokenizer = engine.model.tokenizer
    texts = ["三角形ABC中，∠C = 90° 🙂\n\nAB = 10.\n\nAnswer: 4.8", "Answer: 5"]
    ids = [tokenizer(t + "<|im_end|>", add_special_tokens=False)["input_ids"] for t in texts]
    assert ids[0][-1] == 151645 and max(ids[0]) < 151936
    raw = group_dict(rewards=(1.0, 0.0), texts=texts)
    for response, token_ids in zip(raw["responses"], ids):
        response["token_ids"] = token_ids
    result = LocalService(engine).reweight([raw])[0]
    assert result.error is None
    first = result.responses[0]
    assert len(first.token_advantages) == len(ids[0])
    assert [(p.char_start, p.char_end) for p in first.paragraphs][:2] == [(0, 20), (20, 30)]
    decoded = engine.model.decode(ids[0])
    assert decoded.text == texts[0] + "<|im_end|>"
    # the decoded text of each paragraph's tokens is that paragraph's span
    for p in first.paragraphs:
        assert tokenizer.decode(ids[0][p.token_start:p.token_end]) == decoded.text[p.char_start:p.char_end]


def test_batching_groups_together_changes_no_result(default_engine):
    """Groups with different images and prompts give the same results whether the engine
    runs them in one batched forward or one at a time."""
    other = group_dict(texts=TEXTS[::-1])
    other["image"]["data"] = base64.b64encode(png_bytes(300, 120)).decode()
    other["prompt"] = "A much longer prompt about the figure, so the two prefixes differ in length."
    merging = Engine(default_engine.model, limits=EngineLimits(merge_groups=True))
    assert merging._merge_groups and not default_engine._merge_groups  # CPU default: no merging
    together = LocalService(merging).reweight([group_dict(), other])
    alone = LocalService(default_engine).reweight([group_dict()]) + LocalService(default_engine).reweight([other])
    for a, b in zip(together, alone):
        assert a.key_tokens == b.key_tokens and a.selected_tokens == b.selected_tokens
        for ra, rb in zip(a.responses, b.responses):
            np.testing.assert_allclose(ra.token_advantages, rb.token_advantages, atol=1e-6)
            np.testing.assert_allclose([p.alpha for p in ra.paragraphs], [p.alpha for p in rb.paragraphs], atol=1e-6)


def test_schema_errors_point_at_the_field_in_process(default_engine):
    """In-process schema errors get the same JSON pointer the server and CLI give."""
    bad = group_dict()
    bad["responses"][1]["reward"] = "high"
    result = LocalService(default_engine).reweight([bad])[0]
    assert result.error.pointer == "/responses/1/reward" and result.error.status == 422
