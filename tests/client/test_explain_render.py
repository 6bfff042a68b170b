"""The explain renderer on planted inputs (no model): pixels read back at every visual
token's centre, the shading order of segments, pagination and wrapping, the HTML."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PIL = pytest.importorskip("PIL", reason="the explain view needs Pillow (pip install 'kawhi-rl[explain]')")
from kawhi_client.explain import ExplainedResult, build_view, explain  # noqa: E402
from kawhi_client.explain.png import TEXT_WIDTH, display_cell, render_pages, wrap  # noqa: E402
from kawhi_client.explain.style import (  # noqa: E402
    HEAT_OPACITY,
    blend,
    font,
    heat_rgb,
    token_rgb,
    weight_rgb,
    weight_tint,
)
from PIL import Image  # noqa: E402

GREY = (128, 128, 128)


def planted(rows=6, cols=9, seed=0, weights=None, n_responses=2, text_words=12, image=None):
    """A group/result pair with random key and sampled tokens and planted paragraph weights."""
    rng = random.Random(seed)
    n = rows * cols
    tokens = list(range(n))
    rng.shuffle(tokens)
    key = sorted(tokens[: n // 4])
    selected = sorted(tokens[: n // 4 + n // 5])
    responses_in, responses_out = [], []
    for r in range(n_responses):
        ws = weights if weights is not None else [rng.uniform(0.1, 1.0) for _ in range(4)]
        paragraphs, text = [], ""
        for j, w in enumerate(ws):
            body = " ".join(f"word{r}{j}{k}" for k in range(text_words)) + ".\n\n"
            paragraphs.append(dict(char_start=len(text), char_end=len(text) + len(body), token_start=j,
                                   token_end=j + 1, alpha=rng.uniform(-0.1, 0.1), weight=w))
            text += body
        responses_in.append({"text": text, "reward": float(r % 2)})
        responses_out.append(dict(advantage=1.0 if r % 2 else -1.0, paragraphs=paragraphs,
                                  token_advantages=[], token_weights=[]))
    group = {"id": f"planted-{seed}", "image": {"path": "x.png"}, "prompt": "What is planted?",
             "responses": responses_in}
    result = {"grid": [rows, cols], "key_tokens": key, "selected_tokens": selected, "responses": responses_out}
    if image is None:
        image = Image.new("RGB", (cols * 28, rows * 28), GREY)
    return group, result, image


def centre(origin, cell, index, cols):
    r, c = divmod(index, cols)
    return origin[0] + c * cell + cell // 2, origin[1] + r * cell + cell // 2


def close(a, b, tol=2):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("grid", [(6, 9), (3, 20), (24, 4)])
def test_overlay_colour_at_every_token_centre_names_its_class(grid):
    rows, cols = grid
    group, result, image = planted(rows, cols, seed=rows)
    view = build_view(group, result, image)
    rendered = render_pages(view)
    page = rendered.pages[0]
    expected = {cls: token_rgb(GREY, cls) for cls in ("key", "sampled", "other")}
    assert len(set(expected.values())) == 3  # three classes, three colours
    seen = set()
    for index in range(rows * cols):
        pixel = page.getpixel(centre(rendered.token_origin, rendered.cell, index, cols))
        nearest = min(expected, key=lambda cls: sum((p - e) ** 2 for p, e in zip(pixel, expected[cls])))
        assert nearest == view.token_class(index), (index, pixel)
        assert close(pixel, expected[nearest]), (index, pixel, expected[nearest])
        seen.add(nearest)
    assert seen == {"key", "sampled", "other"}


def test_overlay_on_a_real_example_image_tints_exactly_the_planted_tokens():
    example = Image.open(ROOT / "examples" / "images" / "bar_chart.png").convert("RGB")
    group, result, _ = planted(12, 16, seed=3)
    view = build_view(group, result, example)
    rendered = render_pages(view)
    cell = rendered.cell
    shown = view.image.resize((16 * cell, 12 * cell), Image.Resampling.BICUBIC)
    for index in range(12 * 16):
        x, y = centre((0, 0), cell, index, 16)
        under = shown.getpixel((x, y))
        pixel = rendered.pages[0].getpixel((x + rendered.token_origin[0], y + rendered.token_origin[1]))
        assert close(pixel, token_rgb(under, view.token_class(index))), (index, pixel, under)


def test_heat_map_colour_at_every_token_centre_follows_its_value():
    rows, cols = 5, 7
    group, result, image = planted(rows, cols, seed=1)
    values = [random.Random(i).uniform(-0.2, 0.2) for i in range(rows * cols)]
    maps = [values, [0.0] * (rows * cols)]
    result = ExplainedResult.model_validate({**result, "visual_alignment": maps})
    view = build_view(group, result, image, heatmap_response=0)
    rendered = render_pages(view)
    assert rendered.heat_origin is not None
    low, high = min(values), max(values)
    for index, value in enumerate(values):
        pixel = rendered.pages[0].getpixel(centre(rendered.heat_origin, rendered.cell, index, cols))
        assert close(pixel, blend(GREY, heat_rgb((value - low) / (high - low)), HEAT_OPACITY)), index


def test_heat_map_needs_the_engines_alignment():
    group, result, image = planted()
    with pytest.raises(ValueError, match="only the engine"):
        build_view(group, result, image, heatmap_response=0)
    with pytest.raises(ValueError, match="does not exist"):
        build_view(group, {**result, "visual_alignment": [[0.0] * 54] * 2}, image, heatmap_response=5)


def luminance(rgb):
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


@pytest.mark.parametrize("seed", range(5))
def test_shading_order_of_paragraphs_follows_their_weights(seed):
    rng = random.Random(seed)
    weights = [round(rng.uniform(0.05, 1.6), 3) for _ in range(6)]
    group, result, image = planted(weights=weights, seed=seed, n_responses=1)
    view = build_view(group, result, image)
    rendered = render_pages(view)
    shades = []
    for j, w in enumerate(weights):
        page_index, (x0, y0, x1, y1) = rendered.segment_boxes[(0, j)]
        swatch = rendered.pages[page_index].getpixel(((x0 + x1) // 2, (y0 + y1) // 2))
        assert swatch == weight_rgb(w, view.weight_top)
        shades.append(luminance(swatch))
    by_weight = sorted(range(len(weights)), key=lambda j: weights[j])
    by_darkness = sorted(range(len(weights)), key=lambda j: -shades[j])
    assert by_weight == by_darkness, (weights, shades)


def test_shade_scale_is_monotone():
    top = 1.0
    lum = [luminance(weight_rgb(top * i / 100, top)) for i in range(101)]
    assert all(a > b for a, b in zip(lum, lum[1:]))
    tint = [luminance(weight_tint(top * i / 100, top)) for i in range(101)]
    assert all(a >= b for a, b in zip(tint, tint[1:]))


def test_long_responses_wrap_and_many_responses_paginate():
    group, result, image = planted(n_responses=24, text_words=80, seed=2)
    monster = "x" * 3000
    group["responses"][0]["text"] = monster + "\n\n" + group["responses"][0]["text"]
    result["responses"][0]["paragraphs"] = [dict(char_start=0, char_end=3002, token_start=0, token_end=1,
                                                 alpha=0.0, weight=0.5)] + [
        {**p, "char_start": p["char_start"] + 3002, "char_end": p["char_end"] + 3002}
        for p in result["responses"][0]["paragraphs"]]
    view = build_view(group, result, image)
    rendered = render_pages(view, max_page_height=1200)
    assert len(rendered.pages) > 3
    assert all(p.height <= 1200 for p in rendered.pages)
    assert all(p.width == rendered.pages[0].width for p in rendered.pages)
    # every segment of every response was drawn somewhere
    expected = {(r, j) for r, resp in enumerate(result["responses"]) for j in range(len(resp["paragraphs"]))}
    assert set(rendered.segment_boxes) == expected
    lines = wrap(monster, 14, TEXT_WIDTH - 40)
    assert "".join(lines) == monster and len(lines) > 5
    assert all(font(14).getlength(line) <= TEXT_WIDTH - 40 for line in lines)
    # the image column is repeated on every page
    for page in rendered.pages[1:]:
        x, y = centre(rendered.token_origin, rendered.cell, 0, 9)
        assert page.getpixel((x, y)) == rendered.pages[0].getpixel((x, y))


def test_sentence_granularity_flows_inline_with_shaded_runs():
    group, result, image = planted(n_responses=1, weights=[0.2, 0.9, 0.5])
    resp = result["responses"][0]
    text = group["responses"][0]["text"].replace(".\n\n", ". ")
    group["responses"][0]["text"] = text
    view = build_view(group, result, image)
    assert not view.responses[0].blocks
    rendered = render_pages(view)
    for j, p in enumerate(resp["paragraphs"]):
        page_index, (x0, y0, x1, y1) = rendered.segment_boxes[(0, j)]
        # the run's top-left corner is background (text is drawn a few px in)
        assert rendered.pages[page_index].getpixel((x0, y0)) == weight_tint(p["weight"], view.weight_top)


def test_html_is_self_contained_and_coloured_by_weight():
    group, result, image = planted(seed=4)
    doc = explain(group, result, image).html()
    assert doc.startswith("<!DOCTYPE html>")
    refs = re.findall(r'(?:href|src)="([^"]*)"', doc)
    assert refs and all(ref.startswith("data:image/png;base64,") for ref in refs)
    urls = set(re.findall(r"(?:https?:)?//[^\s\"')]+", re.sub(r"data:[^\"]+", "", doc)))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # a namespace name, never fetched
    assert "<script" not in doc and "<link" not in doc and "@import" not in doc
    assert doc.count("data:image/png;base64,") == 1
    view = build_view(group, result, image)
    for response in view.responses:
        for seg in response.segments:
            colour = "#{:02x}{:02x}{:02x}".format(*weight_tint(seg.weight, view.weight_top))
            assert f'data-weight="{seg.weight:.6g}"' in doc
            assert colour in doc
    assert doc.count('class="tip"') == sum(len(r.segments) for r in view.responses)


def test_failed_or_mismatched_results_are_refused():
    group, result, image = planted()
    with pytest.raises(ValueError, match="failed"):
        build_view(group, {"error": {"title": "Invalid", "status": 422, "detail": "bad"}}, image)
    with pytest.raises(ValueError, match="do not belong"):
        build_view(group, {**result, "responses": result["responses"][:1]}, image)


def test_display_cell_keeps_token_centres_addressable():
    for grid in [(1, 1), (2, 200), (200, 2), (60, 60), (12, 16)]:
        cell = display_cell(grid)
        assert cell >= 4 and grid[1] * cell <= max(560, 4 * grid[1])


@pytest.mark.parametrize("page_height", [700, 900, 1333])
def test_page_breaks_never_orphan_a_header_or_a_label(page_height):
    group, result, image = planted(n_responses=12, text_words=60, seed=7)
    view = build_view(group, result, image)
    rendered = render_pages(view, max_page_height=page_height)
    assert len(rendered.pages) > 1
    for page in rendered.pages:
        assert page.height <= max(page_height, rendered.pages[0].height)
    # each segment's label (its first row) sits on the page where its text starts: the swatch
    # continues right below the label's box
    for (r, j), (page_index, (x0, _y0, x1, y1)) in rendered.segment_boxes.items():
        below = rendered.pages[page_index].getpixel(((x0 + x1) // 2, y1 + 2))
        assert below == weight_rgb(result["responses"][r]["paragraphs"][j]["weight"], view.weight_top), (r, j)


# ---------------------------------------------------------------- settings, notes, paragraph map, reflow

SETTINGS = {"estimator": "grpo", "std": "population", "temperature": 0.1, "smoothing": 0.1, "w_min": 0.1,
            "w_max": 1.0, "normalize": "none", "heads": "preset", "heads_source": "published:qwen2.5-vl-7b",
            "seed": 3, "regions": "sguf", "similarity": "query_key", "granularity": "paragraph", "rope": "after",
            "skip_ratio": 0.7, "sguf": {"delta_s": 0.5, "delta_l": 30.0, "beta": 0.1, "sigma": 1.0}}


def test_the_settings_that_produced_the_weights_are_shown() -> None:
    group, result, image = planted()
    view = build_view(group, result, image, settings=SETTINGS)
    text = " ".join(view.settings_lines())
    for needle in ("T = 0.1", "smoothing lambda = 0.1", "[0.1, 1.0]", "normalize: none",
                   "alignment heads: preset (source: published:qwen2.5-vl-7b)", "regions: sguf", "beta = 0.1",
                   "delta_s = 0.5", "delta_l = 30.0", "seed 3", "estimator: grpo"):
        assert needle in text, needle
    page = explain(group, result, image, settings=SETTINGS).html()
    assert "<h2>Settings</h2>" in page and "source: published:qwen2.5-vl-7b" in page
    assert build_view(group, result, image).settings_lines() == []  # no settings given: no block


def test_normalize_none_says_that_paragraph_count_dominates() -> None:
    group, result, image = planted(weights=[0.5, 0.5, 0.5])
    note = build_view(group, result, image, settings=SETTINGS).normalize_note()
    # w_min + (w_max - w_min) / M: one paragraph keeps 1.0, five get 0.28 each
    assert "1 paragraph: 1.00" in note and "3 paragraphs: 0.40" in note and "5 paragraphs: 0.28" in note
    assert "paragraph count dominates" in note
    assert build_view(group, result, image, settings={**SETTINGS, "normalize": "mean"}).normalize_note() is None
    assert "paragraph count dominates" in explain(group, result, image, settings=SETTINGS).html()


def test_a_group_whose_advantages_are_all_zero_draws_its_weights_in_grey() -> None:
    from kawhi_client.explain.style import ZERO_ADVANTAGE_SWATCH

    group, result, image = planted(weights=[0.2, 0.9])
    coloured = render_pages(build_view(group, result, image))
    for response in result["responses"]:
        response["advantage"] = 0.0
    view = build_view(group, result, image)
    grey = render_pages(view)
    for (r, s), (page, box) in grey.segment_boxes.items():
        assert grey.pages[page].getpixel((box[0] + 2, box[1] + 2)) == ZERO_ADVANTAGE_SWATCH, (r, s)
        cpage, cbox = coloured.segment_boxes[(r, s)]
        weight = result["responses"][r]["paragraphs"][s]["weight"]
        assert coloured.pages[cpage].getpixel((cbox[0] + 2, cbox[1] + 2)) == weight_rgb(weight, 1.0)
    html = explain(group, result, image).html()
    assert "every group advantage is 0" in html and view.advantages_all_zero


def test_the_per_paragraph_heat_map_has_a_cell_per_paragraph_in_its_weight_colour() -> None:
    from kawhi_client.explain.png import PMAP_CELL_H, PMAP_CELL_W

    weights = [0.1, 0.35, 0.6, 0.95]
    group, result, image = planted(weights=weights, n_responses=3)
    view = build_view(group, result, image)
    rendered = render_pages(view)
    page, (x0, y0, _, _) = rendered.paragraph_map_box
    for r in range(3):
        for j, weight in enumerate(weights):
            pixel = rendered.pages[page].getpixel((x0 + j * PMAP_CELL_W + 1, y0 + r * (PMAP_CELL_H + 2) + 1))
            assert pixel == weight_rgb(weight, view.weight_top), (r, j)
    table = re.search(r'<table class="pmap">(.*?)</table>', explain(group, result, image).html()).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows) == 3
    assert [[float(w) for w in re.findall(r'data-weight="([^"]+)"', row)] for row in rows] == [weights] * 3


def test_the_html_reflows_instead_of_clipping() -> None:
    group, result, image = planted()
    page = explain(group, result, image).html()
    assert "flex-wrap: wrap" in page and "svg { display: block; max-width: 100%; height: auto; }" in page
    assert not re.search(r"min-width: (?:[4-9]\d\d|\d{4,})px", page)  # nothing forces a wide page
