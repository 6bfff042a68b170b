"""kawhi.engine.memory: the memory model's parts and the batch token budget it derives."""

from __future__ import annotations

from dataclasses import replace

from kawhi.engine.engine import Engine
from kawhi.engine.memory import GIB, ModelShape, batch_token_budget, estimate, summary
from tiny_models import tiny_reference

# Qwen2.5-VL-7B's text shape in bf16, weights counted by bench.real_shapes.parameter_count
QWEN7B = ModelShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, head_dim=128, vocab=152064,
                    weights_bytes=8_292_166_656 * 2, dtype_bytes=2)


def test_shape_counts_each_parameter_once():
    reference = tiny_reference("qwen2_5_vl")
    model = reference.model
    seen, expected = set(), 0
    for tensor in model.state_dict().values():  # tied weights share storage: count it once
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            expected += tensor.numel() * tensor.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if b.data_ptr() in seen)
    shape = ModelShape.of(model)
    assert shape.weights_bytes == expected - buffers
    assert (shape.layers, shape.hidden, shape.dtype_bytes) == (2, 64, 4)


def test_parts_grow_with_what_they_say():
    base = dict(prefix_tokens=300, visual_tokens=256, response_tokens=[1024] * 5)
    small, long = estimate(QWEN7B, **base), estimate(QWEN7B, **{**base, "response_tokens": [2048] * 5})
    assert long["outputs"] == 2 * small["outputs"] and long["activations"] == 2 * small["activations"]
    deeper = estimate(replace(QWEN7B, layers=56), **base)
    assert deeper["activations"] == small["activations"]  # layers run one after another
    assert deeper["caches"] > small["caches"]  # the prefix keeps K/V of every layer
    # the logits chunk bounds the log-prob path whatever the vocabulary
    ref = estimate(QWEN7B, **base, logprobs=True)
    huge_vocab = estimate(replace(QWEN7B, vocab=10 * QWEN7B.vocab), **base, logprobs=True)
    assert ref["caches"] == huge_vocab["caches"] and ref["caches"] > small["caches"]
    assert ref["total"] == sum(v for k, v in ref.items() if k != "total")


def test_budget_is_the_largest_batch_that_fits():
    device = 80 * 10**9
    budget = batch_token_budget(QWEN7B, device)
    assert budget > 0 and budget % 1024 == 0

    def total(tokens: int) -> int:
        return estimate(QWEN7B, prefix_tokens=1024, visual_tokens=1024, response_tokens=[1024] * (tokens // 1024),
                        logprobs=True, max_forward_tokens=tokens, runtime_bytes=3 * GIB)["total"]

    assert total(budget) <= 0.9 * device < total(budget + 1024)
    assert batch_token_budget(QWEN7B, 141 * 10**9) > budget > batch_token_budget(QWEN7B, 24 * 10**9)
    assert batch_token_budget(QWEN7B, 10 * 10**9) == 0  # the weights alone do not fit


def test_engine_info_shows_the_model_and_budgets():
    info = Engine(tiny_reference("qwen2_5_vl")).info()["memory"]
    assert info["shape"]["layers"] == 2
    assert set(info["batch_token_budget"]) == {"H100 80GB", "H200 141GB", "L4 24GB"}
    assert info["weights_bytes_bf16"] * 2 == info["shape"]["weights_bytes"]
    assert summary(QWEN7B)["batch_token_budget"]["L4 24GB"] < summary(QWEN7B)["batch_token_budget"]["H100 80GB"]
