"""Shared prefixes: split attention is exact and copies nothing; the prefix cache keeps,
evicts and coalesces; one group sent as single-response groups costs one prefix."""

from __future__ import annotations

import base64
import io
import threading
import time

import pytest
import torch
from kawhi.models import prefix as prefix_module
from kawhi.models.prefix import LayerInputs, PrefixCache, PrefixState
from kawhi.pipeline.local import LocalService
from PIL import Image, ImageDraw
from tiny_models import ARCHITECTURES, tiny_reference

RESPONSES = ["First, the bar chart shows 42.\n\nTherefore the answer is 7.", "So the axis reads 3.", "",
             "A longer one: the line rises, then falls, then rises again to the top."]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reference(request):
    return tiny_reference(request.param)


def figure(width=200, height=150, mark=0) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([30, 30, 120, 100], outline="black", width=3)
    draw.ellipse([5 + mark, 5, 15 + mark, 15], fill="red")
    return image


def full_forward(reference, prompt, response_ids):
    ids = torch.cat([prompt.input_ids, torch.tensor(response_ids, dtype=torch.long)])
    whole = type(prompt)(ids, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
    with torch.inference_mode():
        out = reference._run_until_final_layer(
            input_ids=ids[None], pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
            mm_token_type_ids=(ids[None] == reference.image_token_id).int(),
            position_ids=reference.prompt_positions(whole))
    return out.hidden[0, prompt.input_ids.numel():]


def mixed_groups(reference):
    """Three prefixes of different lengths; the first one twice (equal cache keys)."""
    groups = []
    for i, (size, text) in enumerate((((200, 150), "Describe the figure."), ((120, 260), "x"),
                                      ((300, 90), "What is drawn here?"))):
        resized, _ = reference.resize_image(figure(*size))
        prompt = reference.encode_prompt(resized, prompt=text)
        prompt.cache_key = f"test:{i}"
        groups.append((prompt, [reference.tokenize(t).token_ids for t in RESPONSES]))
    groups.append((groups[0][0], [reference.tokenize(t).token_ids for t in reversed(RESPONSES)]))
    return groups


def test_split_attention_is_exact_on_every_architecture(reference):
    assert reference.split_capable and reference.split_attention  # CPU default
    groups = mixed_groups(reference)
    worst = 0.0
    for merge in (True, False):
        split = reference.final_layer_inputs_many(groups, merge_groups=merge, max_padding=float("inf"),
                                                  split_attention=True)
        copied = reference.final_layer_inputs_many(groups, merge_groups=merge, max_padding=float("inf"),
                                                   split_attention=False)
        for (prompt, responses), a, b in zip(groups, split, copied):
            torch.testing.assert_close(a.visual.hidden, b.visual.hidden, atol=0, rtol=0)
            for ids, x, y in zip(responses, a.responses, b.responses):
                assert x.hidden.shape == (len(ids), reference.model.config.get_text_config().hidden_size)
                if ids:
                    worst = max(worst, (x.hidden - y.hidden).abs().max().item(),
                                (x.hidden - full_forward(reference, prompt, ids)).abs().max().item())
                    torch.testing.assert_close(x.cos, y.cos, atol=0, rtol=0)
    assert worst <= 1e-5, worst


def test_split_path_reads_the_one_stored_copy_of_the_prefix(reference, monkeypatch):
    """Every prefix-attention call gets the stored key tensor itself (same storage): nothing
    is repeated per response, and the per-row copy is never built."""
    groups = mixed_groups(reference)[:1]
    seen: list[int] = []
    original = prefix_module.attention_with_lse

    def spy(q, k, v, causal, scale):
        if not causal:
            seen.append(k.untyped_storage().data_ptr())
        return original(q, k, v, causal, scale)

    monkeypatch.setattr(prefix_module, "attention_with_lse", spy)
    monkeypatch.setattr(reference, "_padded_prefix_cache", lambda *a: pytest.fail("copied the prefix KV"))
    cache = PrefixCache(1 << 30)
    reference.final_layer_inputs_many(groups, prefix_cache=cache, split_attention=True)
    (state,) = cache._entries.values()
    stored = {k.untyped_storage().data_ptr() for k in state.keys}
    n_layers = len(state.keys)
    assert len(seen) == n_layers and set(seen) == stored


def _state(nbytes: int) -> PrefixState:
    hidden = torch.zeros(nbytes // 4)
    empty = torch.zeros(0)
    return PrefixState([], [], LayerInputs(hidden, empty, empty), 0, 0)


def test_prefix_cache_is_a_byte_bounded_lru():
    cache = PrefixCache(1000)
    calls = []

    def make(key, size):
        return cache.get_or_compute(key, lambda: (calls.append(key), _state(size))[1])

    a = make("a", 400)
    make("b", 400)
    assert make("a", 400) is a  # hit; "a" is now the most recent
    make("c", 400)  # evicts "b", the least recent
    assert calls == ["a", "b", "c"]
    make("b", 400)
    assert calls[-1] == "b"
    make("huge", 4000)  # returned, never kept
    make("huge", 4000)
    assert calls.count("huge") == 2
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 6 and stats["evictions"] == 2
    assert stats["bytes"] == sum(s.nbytes for s in cache._entries.values()) <= 1000


@pytest.mark.parametrize("max_bytes", [0, 1 << 20])
def test_concurrent_requests_for_one_prefix_compute_it_once(max_bytes):
    """Callers arriving while a prefix is computed wait for that computation and get its
    state, even when the cache keeps nothing (max_bytes 0)."""
    cache = PrefixCache(max_bytes)
    release = threading.Event()
    calls, results = [], []

    def compute():
        calls.append(1)
        release.wait(5)
        return _state(64)

    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute)))
               for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while cache.stats()["coalesced"] < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 4 and len({id(r) for r in results}) == 1
    assert cache.stats()["coalesced"] == 3 and cache.stats()["misses"] == 1


def test_a_failed_computation_lets_the_next_caller_try_again():
    cache = PrefixCache(1 << 20)

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        cache.get_or_compute("k", boom)
    assert cache.get_or_compute("k", lambda: _state(8)).nbytes == 8


# ---------------------------------------------------------------------- through the engine


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def engine():
    from kawhi.engine.engine import Engine

    return Engine(tiny_reference("qwen2_5_vl"))


def test_one_group_sent_as_single_response_groups_costs_one_prefix(engine, monkeypatch):
    """Five one-response groups of one image + prompt in one run: one prefix forward, and
    the same weights as the five-response group."""
    texts = [RESPONSES[0], RESPONSES[1], RESPONSES[3], "Seven.", "The answer is 42."]
    image = _png(figure(mark=7))
    whole = {"image": {"data": image}, "prompt": "Read the chart.", "responses": [{"text": t} for t in texts],
             "advantages": [1.0] * 5}
    singles = [{**whole, "responses": [{"text": t}], "advantages": [1.0]} for t in texts]
    computed = []
    original = engine.model._prefix
    monkeypatch.setattr(engine.model, "_prefix", lambda p: (computed.append(p.cache_key), original(p))[1])
    engine.prefix_cache.clear()
    split = LocalService(engine).reweight(singles)
    assert len(computed) == 1
    group = LocalService(engine).reweight([whole])
    assert len(computed) == 1  # the second request found it in the cache
    assert engine.prefix_cache.stats()["hits"] >= 1
    for single, response in zip(split, group[0].responses):
        (got,) = single.responses
        assert got.token_weights == pytest.approx(response.token_weights, abs=1e-6)
    distinct = [{**s, "image": {"data": _png(figure(mark=20 + i))}} for i, s in enumerate(singles)]
    LocalService(engine).reweight(distinct)
    assert len(computed) == 6


def test_server_settings_reach_the_engine():
    from kawhi.pipeline.limits import engine_limits
    from kawhi.settings import Settings

    limits = engine_limits(Settings(cache_prefix_bytes=0, split_attention=False))
    assert limits.prefix_cache_bytes == 0 and limits.split_attention is False
    assert engine_limits(Settings()).split_attention is None  # auto: where it measured faster


@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_lse_matches_plain_matmuls(causal):
    from kawhi.models.prefix import attention_with_lse, reference_attention_with_lse

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, causal, 0.25)
    ref_out, ref_lse = reference_attention_with_lse(q, k, v, causal, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
