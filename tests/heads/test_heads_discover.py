"""`kawhi heads discover` against planted ground truth, and its parts checked against independent computations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kawhi.discovery.discover import DiscoveryError, DiscoverySettings, discover, load_vqa_jsonl
from kawhi.discovery.masking import decoder_layers
from kawhi.discovery.scoring import AnswerScorer
from kawhi.discovery.stats import bootstrap_mean
from kawhi.discovery.synthetic import KINDS, synthetic_vqa, write_synthetic_vqa
from kawhi.engine.engine import Engine
from kawhi.heads.files import write_heads_file
from PIL import Image
from planted_heads import DECOY_HEAD, PLANTED, TEXT_HEAD, colour_items, planted_reference
from tiny_models import tiny_reference

ROOT = Path(__file__).resolve().parents[2]
FAST = DiscoverySettings(all_heads=True, bootstrap=2000)


@pytest.fixture(scope="module")
def planted():
    return planted_reference()


def _item(scorer: AnswerScorer):
    return scorer.encode(Image.new("RGB", (96, 64), (10, 200, 30)), "What is shown?", "a green field")


# ---------------------------------------------------------------------- parts


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_masking_a_head_equals_zeroing_its_output_projection_columns(arch):
    reference = tiny_reference(arch, seed=3)
    scorer = AnswerScorer(reference)
    item = _item(scorer)
    base = scorer.log_likelihood(item)
    masked = scorer.log_likelihood(item, [1, 2])
    assert masked != pytest.approx(base, abs=1e-4)
    head_dim = decoder_layers(reference)[0].self_attn.o_proj.in_features // reference.num_heads
    with torch.no_grad():
        saved = [layer.self_attn.o_proj.weight.clone() for layer in decoder_layers(reference)]
        for layer in decoder_layers(reference):
            for h in (1, 2):
                layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
    try:
        assert scorer.log_likelihood(item) == pytest.approx(masked, abs=1e-5)
    finally:
        with torch.no_grad():
            for layer, weight in zip(decoder_layers(reference), saved):
                layer.self_attn.o_proj.weight.copy_(weight)
    assert scorer.log_likelihood(item) == pytest.approx(base, abs=1e-6)  # the hooks are gone


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_several_masks_in_one_forward_equal_one_forward_each(arch):
    reference = tiny_reference(arch, seed=2)
    scorer = AnswerScorer(reference)
    item = _item(scorer)
    masks = [[], [0], [3], [1, 2]]
    batched = scorer.log_likelihoods(item, masks)
    np.testing.assert_allclose(batched, [scorer.log_likelihood(item, m) for m in masks], atol=1e-5)
    assert len(set(np.round(batched, 4))) == len(masks)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_screen_equals_the_eager_attention_maps(arch):
    reference = tiny_reference(arch, seed=1)
    scorer = AnswerScorer(reference)
    item = _item(scorer)
    share = scorer.attention_share(item)
    reference.model.set_attn_implementation("eager")
    ids = item.inputs.input_ids[None]
    with torch.inference_mode():
        out = reference.model.model(input_ids=ids, pixel_values=item.inputs.pixel_values,
                                    image_grid_thw=item.inputs.image_grid_thw,
                                    mm_token_type_ids=(ids == reference.image_token_id).int(),
                                    position_ids=item.positions, output_attentions=True)
    visual = item.inputs.visual_positions
    expected = torch.stack([a[0][:, item.rows][..., visual].sum(-1).mean(-1) for a in out.attentions]).mean(0)
    np.testing.assert_allclose(share, expected.numpy(), atol=1e-5)


def test_bootstrap_interval():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 1.0, size=400)
    interval = bootstrap_mean(values, 0.95, 4000, np.random.default_rng(1))
    assert interval.low < values.mean() < interval.high and interval.low > 0.8 and interval.high < 1.2
    wider = bootstrap_mean(values, 0.999, 4000, np.random.default_rng(1))
    assert wider.low < interval.low and wider.high > interval.high
    flat = bootstrap_mean(np.zeros(10), 0.95, 1000, np.random.default_rng(1))
    assert (flat.low, flat.high) == (0.0, 0.0)


def test_synthetic_set_is_reproducible_and_labelled(tmp_path):
    a, b = synthetic_vqa(12, seed=4), synthetic_vqa(12, seed=4)
    assert [(x.question, x.answer) for x in a] == [(x.question, x.answer) for x in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert len({x.question.split("?")[0] for x in a}) >= len(KINDS) - 1  # every kind appears
    path = write_synthetic_vqa(tmp_path, 6, seed=4)
    items, digest = load_vqa_jsonl(path)
    assert [(x.question, x.answer) for x in items] == [(x.question, x.answer) for x in a[:6]]
    assert load_vqa_jsonl(path)[1] == digest and len(digest) == 64


@pytest.mark.parametrize("line, match", [
    ("nope", ":1: not JSON"), ('{"image": {"path": "missing.png"}, "question": "q", "answer": "a"}', "cannot read"),
    ('{"image": {"path": "x.png"}, "question": "q"}', "answer"),
])
def test_bad_data_lines_are_named(tmp_path, line, match):
    path = tmp_path / "vqa.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DiscoveryError, match=match):
        load_vqa_jsonl(path)


# ---------------------------------------------------------------------- planted ground truth


def test_planted_heads_are_recovered_exactly(planted, tmp_path):
    report = discover(planted, colour_items(24, seed=7), settings=FAST)
    found, truth = set(report["heads"]), set(PLANTED)
    precision = len(found & truth) / max(len(found), 1)
    recall = len(found & truth) / len(truth)
    assert (precision, recall) == (1.0, 1.0), report["results"]
    results = {r["head"]: r for r in report["results"]}
    # the text head matters a lot, but no less without the image: rejected by the blank control
    assert results[TEXT_HEAD]["drop"]["mean"] > 5 * results[PLANTED[0]]["drop"]["mean"]
    assert results[TEXT_HEAD]["vision_drop"]["mean"] < 0 and not results[TEXT_HEAD]["critical"]
    # the decoy looks at the image more than any head, and carries nothing
    share = AnswerScorer(planted).attention_share(AnswerScorer(planted).encode(*_colour(0)))
    assert int(np.argmax(share)) == DECOY_HEAD
    assert abs(results[DECOY_HEAD]["drop"]["mean"]) < report["threshold_nats"] / 100  # only the norms couple it
    assert not results[DECOY_HEAD]["critical"]
    # the report is a heads file the engine loads as is
    path = tmp_path / "planted.json"
    write_heads_file(path, report)
    info = Engine(planted, heads_file=path).info()
    assert info["heads"] == sorted(PLANTED) and info["heads_source"] == f"file:{path}"


@pytest.mark.parametrize("seed", [1, 4])  # other vision towers, readouts and items; 4 is the tightest seen
def test_planted_recovery_does_not_hang_on_one_seed(seed):
    items = colour_items(24, seed=100 + seed)
    settings = DiscoverySettings(all_heads=True, bootstrap=2000, seed=seed)
    assert discover(planted_reference(seed=seed), items, settings=settings)["heads"] == sorted(PLANTED)
    assert discover(planted_reference(seed=seed, image_blind=True), items, settings=settings)["heads"] == []


def _colour(i: int):
    item = colour_items(4, seed=9)[i]
    return item.image, item.question, item.answer


def test_no_head_on_a_model_whose_answer_cannot_depend_on_the_image():
    report = discover(planted_reference(image_blind=True), colour_items(24, seed=7), settings=FAST)
    assert report["heads"] == []
    assert report["baseline"]["image_gain"]["mean"] == 0.0
    assert all(r["vision_drop"]["mean"] == 0.0 for r in report["results"])
    assert any("does not significantly raise" in note for note in report["notes"])


def test_screen_then_top_k_plus_random_controls(planted):
    report = discover(planted, colour_items(16, seed=7),
                      settings=DiscoverySettings(top_k=2, controls=1, bootstrap=2000, seed=5))
    assert len(report["tested"]) == 3 and len(report["screen"]) == planted.num_heads
    assert report["tested"][0] == DECOY_HEAD  # the top of the screen...
    assert DECOY_HEAD not in report["heads"]  # ...is refused by the causal test
    controls = [r["head"] for r in report["results"] if r["control"]]
    assert len(controls) == 1 and set(report["heads"]) <= set(PLANTED)
    if set(controls) & set(PLANTED):
        assert any("rerun with --all" in note for note in report["notes"])


# ---------------------------------------------------------------------- resuming


class _Interrupt(Exception):
    pass


class _Bar:
    """A progress bar that interrupts the run after ``stop_after`` forwards."""

    def __init__(self, stop_after: int | None) -> None:
        self.stop_after, self.count = stop_after, 0

    def update(self, n: int) -> None:
        self.count += n
        if self.stop_after is not None and self.count >= self.stop_after:
            raise _Interrupt

    def set_postfix_str(self, _s: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_an_interrupted_run_resumes_where_it_stopped(planted, tmp_path):
    items = colour_items(8, seed=3)
    state = tmp_path / "heads.json.partial.jsonl"
    n = len(items)
    with pytest.raises(_Interrupt):  # stop in the middle of the second head
        discover(planted, items, settings=FAST, state_path=state, progress=lambda total: _Bar(2 * n + 2 * n + 3),
                 batch_heads=1)
    lines = [json.loads(line) for line in state.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["header", "baseline", "head"]
    with state.open("a") as out:
        out.write('{"kind": "head", "head": 1, "ima')  # a torn line, as a kill mid-write leaves
    resumed = discover(planted, items, settings=FAST, state_path=state, batch_heads=1)
    assert resumed["timing"]["scores_this_run"] == 2 * n * (planted.num_heads - 1)
    fresh = discover(planted, items, settings=FAST, batch_heads=1)
    strip = lambda r: [{k: v for k, v in x.items() if k != "seconds"} for x in r["results"]]  # noqa: E731
    assert strip(resumed) == strip(fresh) and resumed["heads"] == fresh["heads"]
    assert all(r["seconds"] > 0 for r in resumed["results"])


def test_the_state_of_another_run_is_refused(planted, tmp_path):
    items = colour_items(4, seed=3)
    state = tmp_path / "s.jsonl"
    with pytest.raises(_Interrupt):
        discover(planted, items, settings=FAST, state_path=state, progress=lambda total: _Bar(1))
    with pytest.raises(DiscoveryError, match="another model, data or settings"):
        discover(planted, items, settings=DiscoverySettings(all_heads=True, bootstrap=2000, threshold=0.1),
                 state_path=state)


# ---------------------------------------------------------------------- the command


def test_discover_command_on_the_demo_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "service"), str(ROOT / "client")])}

    def kawhi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kawhi.cli", *args], capture_output=True, text=True,
                              timeout=600, env=env)

    synth = kawhi("heads", "synth", "-o", str(tmp_path / "vqa"), "--items", "6", "--size", "112")
    assert synth.returncode == 0, synth.stderr
    out = tmp_path / "heads.json"
    run = kawhi("heads", "discover", "--data", str(tmp_path / "vqa" / "vqa.jsonl"), "-o", str(out), "--all",
                "--bootstrap", "200")
    assert run.returncode == 0, run.stderr
    assert "heads discover" in run.stderr and "s per head" in run.stderr  # progress bar and timing
    report = json.loads(out.read_text())
    assert report["format"] == "kawhi-heads/1" and report["model"]["num_attention_heads"] == 4
    assert [r["head"] for r in report["results"]] == [0, 1, 2, 3]
    for r in report["results"]:
        assert {"drop", "blank_drop", "vision_drop", "critical", "seconds", "screen"} <= set(r)
    assert report["data"]["items"] == 6 and len(report["data"]["sha256"]) == 64
    assert not (tmp_path / "heads.json.partial.jsonl").exists()
    bad = kawhi("heads", "discover", "--data", str(tmp_path / "missing.jsonl"), "-o", str(out))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
