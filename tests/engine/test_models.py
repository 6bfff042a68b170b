"""The reference-model adapters on tiny random models of each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kawhi.models.qwen import smart_resize
from PIL import Image, ImageDraw
from tiny_models import ARCHITECTURES, tiny_reference

RESPONSES = ["First, the bar chart shows 42.\n\nTherefore the answer is 7.", "So the axis reads 3.", ""]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reference(request):
    return tiny_reference(request.param)


def figure(width=200, height=150) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle([30, 30, 120, 100], outline="black", width=3)
    return image


def full_forward(reference, prompt, response_ids):
    """Final-layer inputs of one response from an independent forward of the whole sequence."""
    ids = torch.cat([prompt.input_ids, torch.tensor(response_ids, dtype=torch.long)])
    whole = type(prompt)(ids, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
    with torch.inference_mode():
        return reference._run_until_final_layer(
            input_ids=ids[None], pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
            mm_token_type_ids=(ids[None] == reference.image_token_id).int(),
            position_ids=reference.prompt_positions(whole))


def test_prompt_has_one_visual_token_per_grid_cell(reference):
    resized, grid = reference.resize_image(figure())
    assert resized.size == (grid[1] * reference.patch_side, grid[0] * reference.patch_side)
    prompt = reference.encode_prompt(resized, prompt="How many sides?")
    assert prompt.grid == grid
    assert prompt.visual_positions.numel() == grid[0] * grid[1]
    assert torch.all(prompt.input_ids[prompt.visual_positions] == reference.image_token_id)
    # visual tokens are contiguous and come before the prompt text
    assert torch.all(prompt.visual_positions.diff() == 1)


def test_shared_prefix_equals_independent_forwards(reference):
    resized, _ = reference.resize_image(figure())
    prompt = reference.encode_prompt(resized, prompt="Describe the figure.")
    responses = [reference.tokenize(text).token_ids for text in RESPONSES]
    states = reference.final_layer_inputs(prompt, responses)
    assert states.visual.hidden.shape[0] == prompt.visual_positions.numel()
    for ids, got in zip(responses, states.responses):
        assert got.hidden.shape[0] == len(ids)
        if not ids:
            continue
        P = prompt.input_ids.numel()
        expected = full_forward(reference, prompt, ids)
        torch.testing.assert_close(got.hidden, expected.hidden[0, P:], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.cos, expected.cos[0, P:])
        torch.testing.assert_close(states.visual.hidden, expected.hidden[0, prompt.visual_positions], atol=1e-4,
                                   rtol=1e-4)


def test_projection_matches_the_attention_modules_own_computation(reference):
    """q/k recomputed from captured inputs equal what the final attention layer computes."""
    resized, _ = reference.resize_image(figure())
    prompt = reference.encode_prompt(resized, prompt="x")
    ids = reference.tokenize(RESPONSES[0]).token_ids
    states = reference.final_layer_inputs(prompt, [ids])
    captured = {}
    attn = reference._final_layer.self_attn
    rope = reference._apply_rope

    def spy(q, k, cos, sin, *args, **kwargs):
        captured["q"], captured["k"] = q, k
        captured["out"] = rope(q, k, cos, sin, *args, **kwargs)
        return captured["out"]

    module = __import__(type(attn).__module__, fromlist=["apply_rotary_pos_emb"])
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = spy
    try:
        full_forward_through_final_layer(reference, prompt, ids)
    finally:
        module.apply_rotary_pos_emb = original
    P = prompt.input_ids.numel()
    q_after = captured["out"][0][0, :, P:]
    k_vis_after = captured["out"][1][0][:, prompt.visual_positions]
    torch.testing.assert_close(reference.project(states.responses[0], "query", rope=True), q_after.float(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference.project(states.visual, "key", rope=True), k_vis_after.float(),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference.project(states.responses[0], "query", rope=False),
                               captured["q"][0, :, P:].float(), atol=1e-4, rtol=1e-4)
    # after-RoPE differs from before-RoPE away from position 0
    assert not torch.allclose(q_after.float(), captured["q"][0, :, P:].float(), atol=1e-3)


def full_forward_through_final_layer(reference, prompt, ids):
    seq = torch.cat([prompt.input_ids, torch.tensor(ids, dtype=torch.long)])
    whole = type(prompt)(seq, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
    with torch.inference_mode():
        reference._base(input_ids=seq[None], pixel_values=prompt.pixel_values,
                        image_grid_thw=prompt.image_grid_thw,
                        mm_token_type_ids=(seq[None] == reference.image_token_id).int(),
                        position_ids=reference.prompt_positions(whole))


def test_forward_stops_before_the_final_layer(reference):
    """The final decoder layer and the LM head never run."""
    calls = []
    layer = reference._final_layer
    handle = layer.mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        resized, _ = reference.resize_image(figure())
        reference.final_layer_inputs(reference.encode_prompt(resized, prompt="x"), [reference.tokenize(" the answer is").token_ids])
    finally:
        handle.remove()
    assert calls == []


def test_response_positions_continue_the_models_own_rope_index(reference):
    resized, _ = reference.resize_image(figure())
    prompt = reference.encode_prompt(resized, prompt="x")
    ids = torch.cat([prompt.input_ids, torch.tensor(reference.tokenize(" the answer is").token_ids[:3])])
    whole = type(prompt)(ids, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
    full = reference.prompt_positions(whole)[:, 0]
    start = int(reference.prompt_positions(prompt).max()) + 1
    assert torch.equal(full[:, -3:], torch.arange(start, start + 3).expand(3, -1))


def test_decode_offsets_cover_the_text_exactly(reference):
    text = "Angle ∠ABC = 90°.\n\n三角形 🙂 done"
    ids = reference.tokenize(text).token_ids
    decoded = reference.decode(ids)
    assert decoded.text == text
    assert decoded.offsets[0][0] == 0 and decoded.offsets[-1][1] == len(text)
    for (s0, e0), (s1, _) in zip(decoded.offsets, decoded.offsets[1:]):
        assert s0 <= e0 and s1 >= e0 - 1  # at most one shared (split multi-byte) character
    # every character is covered by some token
    covered = set()
    for s, e in decoded.offsets:
        covered.update(range(s, e))
    assert covered == set(range(len(text)))


def test_smart_resize_rule():
    assert smart_resize(150, 200, 28, 56 * 56, 28 * 28 * 64) == (140, 196)
    h, w = smart_resize(4000, 4000, 28, 56 * 56, 28 * 28 * 64)
    assert h * w <= 28 * 28 * 64 and h % 28 == 0 and w % 28 == 0
    with pytest.raises(ValueError):
        smart_resize(10, 5000, 28, 56 * 56, 28 * 28 * 64)


def test_groups_batched_together_equal_each_group_alone(reference):
    """Responses of groups with different prefix lengths batched in one forward (padded,
    masked prefixes) give the same states as each group run alone."""
    groups = []
    for size, prompt in (((200, 150), "Describe the figure."), ((120, 260), "x"), ((300, 90), "What is drawn here?")):
        resized, _ = reference.resize_image(figure(*size))
        groups.append((reference.encode_prompt(resized, prompt=prompt),
                       [reference.tokenize(t).token_ids for t in RESPONSES]))
    assert len({p.input_ids.numel() for p, _ in groups}) == 3
    calls = []
    original = reference._continue_prefixes
    reference._continue_prefixes = lambda rows, *a: (calls.append(len(rows)), original(rows, *a))
    try:
        together = reference.final_layer_inputs_many(groups, max_padding=float("inf"))
    finally:
        del reference._continue_prefixes
    assert calls == [6]  # every non-empty response of the three groups in one masked forward
    small_batches = reference.final_layer_inputs_many(groups, max_batch_tokens=1)
    for (prompt, responses), batched, tiny in zip(groups, together, small_batches):
        alone = reference.final_layer_inputs(prompt, responses)
        torch.testing.assert_close(batched.visual.hidden, alone.visual.hidden)
        for got, other, expected in zip(batched.responses, tiny.responses, alone.responses):
            torch.testing.assert_close(got.hidden, expected.hidden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(other.hidden, expected.hidden, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got.cos, expected.cos)


def test_row_packing_respects_budget_padding_and_merge_switch():
    from kawhi.models.qwen import _pack_rows

    groups = [(None, [[1] * 100, [1] * 90]), (None, [[1] * 95, []]), (None, [[1] * 10]), (None, [[1] * 400] * 3)]
    merged = _pack_rows(groups, max_tokens=1000, merge_groups=True, max_padding=1.25)
    assert [[(g, r) for g, r, _ in batch] for batch in merged] == [
        [(0, 0), (0, 1), (1, 0)],  # 3 x 100 padded for 285 real: merged
        [(2, 0)],                  # padding 10 -> 100 would exceed 1.25x
        [(3, 0), (3, 1)], [(3, 2)],  # a group over the budget is split by rows
    ]
    separate = _pack_rows(groups, max_tokens=1000, merge_groups=False, max_padding=1.25)
    assert [{g for g, _, _ in batch} for batch in separate] == [{0}, {1}, {2}, {3}, {3}]
    for batches in (merged, separate):
        for batch in batches:
            assert len(batch) * max(len(t) for _, _, t in batch) <= 1000


def test_an_uncached_hub_id_names_a_download_command_the_installed_hub_ships(tmp_path, monkeypatch) -> None:
    """The hint is a command a user can run: huggingface_hub >= 0.34 ships `hf` (and no longer
    `huggingface-cli`); pyproject's floor guarantees it."""
    import importlib.metadata as md
    import re

    from kawhi.models.locate import ModelNotFound, locate_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is there
    with pytest.raises(ModelNotFound) as info:
        locate_model("nobody/not-cached-model")
    command = re.search(r"run `(\S+) download nobody/not-cached-model`", str(info.value))
    assert command and command.group(1) == "hf", str(info.value)
    scripts = {e.name for e in md.distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert "hf" in scripts
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    floor = re.search(r'"huggingface-hub>=([\d.]+)"', pyproject).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (0, 34)
