"""Reference log-probs and entropy from the alignment forward (kawhi.models.logprobs).

Every number is checked against an independent plain transformers forward of the whole
``[image + prompt] + response`` sequence with the model's LM head (``model(...).logits``),
on each adapter, through the shared-prefix path (G responses over one prefix, batched,
split into several final-layer batches) and through the engine, CLI and HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import math

import pytest
import torch
from kawhi.engine.engine import Engine, OptionsError
from kawhi.models.logprobs import logprobs_from_logits, response_logprobs
from kawhi.pipeline.local import LocalService
from PIL import Image
from test_models import RESPONSES, figure
from tiny_models import ARCHITECTURES, tiny_reference


def peaky(reference):
    """An untied LM head with spread-out logits (a random tiny model's are nearly uniform,
    which would hide an off-by-one position); the plain forward uses the same head."""
    torch.manual_seed(1)
    hidden = reference._final_layer.input_layernorm.weight.numel()
    head = torch.nn.Linear(hidden, reference.vocab_size, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5)
    reference.model.lm_head = head.eval()
    return reference


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reference(request):
    return peaky(tiny_reference(request.param))


def plain_forward(reference, prompt, ids, temperature=1.0):
    """(log-probs of ids, entropies) from one full forward with the LM head over every position."""
    seq = torch.cat([prompt.input_ids, torch.tensor(ids, dtype=torch.long)])
    whole = type(prompt)(seq, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
    with torch.inference_mode():
        logits = reference.model(input_ids=seq[None], pixel_values=prompt.pixel_values,
                                 image_grid_thw=prompt.image_grid_thw,
                                 mm_token_type_ids=(seq[None] == reference.image_token_id).int(),
                                 position_ids=reference.prompt_positions(whole)).logits[0]
    P = prompt.input_ids.numel()
    logp = torch.log_softmax(logits[P - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(ids)[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def group(reference, prompt_text="Describe the figure."):
    resized, _ = reference.resize_image(figure())
    prompt = reference.encode_prompt(resized, prompt=prompt_text)
    responses = [reference.tokenize(t).token_ids for t in RESPONSES] + [reference.tokenize("7").token_ids[:1]]
    return prompt, responses


@pytest.mark.parametrize("max_batch_tokens", [16384, 12])
def test_shared_prefix_logprobs_equal_a_plain_full_forward(reference, max_batch_tokens):
    prompt, responses = group(reference)
    assert [len(r) > 1 for r in responses] == [True, True, False, False]  # long, long, empty, one token
    states = reference.final_layer_inputs(prompt, responses)
    got = response_logprobs(reference, states, responses, max_batch_tokens=max_batch_tokens)
    for ids, values in zip(responses, got):
        assert values.logprobs.shape == values.entropy.shape == (len(ids),)
        if not ids:
            continue
        logp, entropy = plain_forward(reference, prompt, ids)
        torch.testing.assert_close(values.logprobs, logp, atol=1e-4, rtol=0)
        torch.testing.assert_close(values.entropy, entropy, atol=1e-4, rtol=0)
    # the check can fail: the distributions are far from uniform and differ between positions
    long = got[0]
    assert long.entropy.max() < 0.9 * math.log(reference.vocab_size)
    shifted, _ = plain_forward(reference, prompt, responses[0][1:])
    assert (long.logprobs[1:] - shifted).abs().max() > 0.1


def test_temperature_matches_trls_own_computation(reference):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    prompt, responses = group(reference)
    states = reference.final_layer_inputs(prompt, responses)
    ids = responses[0]
    for temperature in (0.7, 1.3):
        got = response_logprobs(reference, states, responses, temperature=temperature)[0]
        # TRL's GRPOTrainer: logits = logits / temperature, then selective_log_softmax / entropy_from_logits
        seq = torch.cat([prompt.input_ids, torch.tensor(ids)])
        whole = type(prompt)(seq, prompt.pixel_values, prompt.image_grid_thw, prompt.visual_positions, prompt.grid)
        with torch.inference_mode():
            logits = reference.model(input_ids=seq[None], pixel_values=prompt.pixel_values,
                                     image_grid_thw=prompt.image_grid_thw,
                                     mm_token_type_ids=(seq[None] == reference.image_token_id).int(),
                                     position_ids=reference.prompt_positions(whole)).logits
        P = prompt.input_ids.numel()
        scaled = logits[:, P - 1 : -1] / temperature
        expected = trl_utils.selective_log_softmax(scaled, torch.tensor(ids)[None])[0]
        torch.testing.assert_close(got.logprobs, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.entropy, trl_utils.entropy_from_logits(scaled)[0], atol=1e-4, rtol=0)
    at_one = response_logprobs(reference, states, responses, temperature=1.0)[0]
    assert (at_one.logprobs - got.logprobs).abs().max() > 1e-2


def test_chunked_lm_head_equals_one_pass():
    logits = torch.randn(37, 1000, dtype=torch.float64) * 4
    targets = torch.randint(0, 1000, (37,))
    lp, ent = logprobs_from_logits(logits, targets, 0.5)
    full = torch.log_softmax(logits / 0.5, -1)
    torch.testing.assert_close(lp, full.gather(-1, targets[:, None])[:, 0].float())
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1).float())
    reference = peaky(tiny_reference("qwen2_5_vl"))
    prompt, responses = group(reference)
    states = reference.final_layer_inputs(prompt, responses)
    one_pass = response_logprobs(reference, states, responses)
    vocab = reference.vocab_size
    chunked = response_logprobs(reference, states, responses, chunk_elements=3 * vocab)  # 3 rows at a time
    for a, b in zip(one_pass, chunked):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- engine, CLI, HTTP


def png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wire_group(reference, token_ids: bool):
    prompt_text = "Describe the figure."
    if token_ids:
        responses = [{"text": "", "token_ids": reference.tokenize(t).token_ids, "reward": float(i % 2)}
                     for i, t in enumerate(RESPONSES)]
    else:
        responses = [{"text": t, "reward": float(i % 2)} for i, t in enumerate(RESPONSES)]
    return {"id": "g", "image": {"data": png(figure())}, "prompt": prompt_text, "responses": responses}


@pytest.mark.parametrize("token_ids", [True, False])
def test_engine_returns_them_only_when_asked(reference, token_ids):
    engine = Engine(reference)
    raw = wire_group(reference, token_ids)
    plain = LocalService(engine).reweight([raw])[0]
    asked = LocalService(engine).reweight([raw], {"return_ref_logprobs": True, "return_entropy": True,
                                    "logprob_temperature": 0.8})[0]
    only_lp = LocalService(engine).reweight([raw], {"return_ref_logprobs": True})[0]
    prompt = reference.encode_prompt(reference.resize_image(figure())[0], prompt="Describe the figure.")
    for i, (a, b) in enumerate(zip(plain.responses, asked.responses)):
        assert "ref_logprobs" not in json.loads(a.model_dump_json()) and "entropy" not in a.model_dump()
        assert a.token_advantages == b.token_advantages  # the weights are the same forward's
        ids = raw["responses"][i].get("token_ids") or reference.tokenize(RESPONSES[i]).token_ids
        assert len(b.ref_logprobs) == len(b.entropy) == len(ids) == len(b.token_advantages)
        if ids:
            logp, entropy = plain_forward(reference, prompt, ids, temperature=0.8)
            torch.testing.assert_close(torch.tensor(b.ref_logprobs), logp, atol=1e-4, rtol=0)
            torch.testing.assert_close(torch.tensor(b.entropy), entropy, atol=1e-4, rtol=0)
        wire = json.loads(only_lp.responses[i].model_dump_json())
        assert "entropy" not in wire and len(wire["ref_logprobs"]) == len(ids)


def test_default_path_never_runs_the_final_layer_or_lm_head(reference):
    engine = Engine(reference)
    raw = wire_group(reference, True)
    calls = []
    handles = [reference._final_layer.mlp.register_forward_hook(lambda *a: calls.append("layer")),
               reference.model.lm_head.register_forward_hook(lambda *a: calls.append("head"))]
    try:
        LocalService(engine).reweight([raw])
        assert calls == []
        LocalService(engine).reweight([raw], {"return_entropy": True})
        assert "layer" in calls and "head" in calls
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("options, field", [({"logprob_temperature": 0.0}, "logprob_temperature"),
                                            ({"logprob_temperature": float("inf")}, "logprob_temperature")])
def test_bad_temperature_is_an_options_error(reference, options, field):
    with pytest.raises(OptionsError) as info:
        Engine(reference).resolve_options(options)
    assert info.value.field == field


def test_wire_options_refuse_non_booleans_and_bad_temperatures():
    from kawhi_client.schema import Options
    from pydantic import ValidationError

    assert Options(return_ref_logprobs=True, logprob_temperature=0.5).return_ref_logprobs is True
    for bad in ({"return_ref_logprobs": "yes"}, {"return_entropy": 1}, {"logprob_temperature": 0},
                {"logprob_temperature": float("nan")}):
        with pytest.raises(ValidationError):
            Options(**bad)


def test_a_model_without_lm_head_refuses_the_option_clearly():
    reference = tiny_reference("qwen2_vl")
    reference.model.lm_head = torch.nn.Identity()
    with pytest.raises(OptionsError, match="LM head") as info:
        Engine(reference).resolve_options({"return_ref_logprobs": True})
    assert info.value.field == "return_ref_logprobs"


def test_cli_flags(tmp_path):
    from test_cli import EXAMPLES, kawhi, read_jsonl

    out, plain_out = tmp_path / "out.jsonl", tmp_path / "plain.jsonl"
    run = kawhi("reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", str(out), "--quiet", "--return-ref-logprobs",
                "--return-entropy", "--logprob-temperature", "0.7")
    assert run.returncode == 0, run.stderr
    plain = kawhi("reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", str(plain_out), "--quiet")
    assert plain.returncode == 0, plain.stderr
    for result, base in zip(read_jsonl(out), read_jsonl(plain_out)):
        for response, plain_response in zip(result["responses"], base["responses"]):
            n = len(response["token_advantages"])
            assert len(response["ref_logprobs"]) == len(response["entropy"]) == n
            assert all(lp <= 0 and math.isfinite(lp) for lp in response["ref_logprobs"])
            assert "ref_logprobs" not in plain_response and "entropy" not in plain_response
    bad = kawhi("reweight", str(EXAMPLES / "rollouts.jsonl"), "-o", str(out), "--quiet",
                "--logprob-temperature", "-1")
    assert bad.returncode == 2 and "logprob-temperature" in bad.stderr


def test_http_round_trip_equals_the_engine():
    import httpx
    from server_fixtures import ServerThread, default_engine

    engine = default_engine()
    raw = wire_group(engine.model, True)
    options = {"return_ref_logprobs": True, "return_entropy": True, "logprob_temperature": 0.9}
    expected = LocalService(engine).reweight([raw], options)[0]
    with ServerThread() as server, httpx.Client(base_url=server.url, timeout=60) as client:
        body = client.post("/v1/reweight", json={"groups": [raw], "options": options}).json()
        plain = client.post("/v1/reweight", json={"groups": [raw]}).json()
        bad = client.post("/v1/reweight", json={"groups": [raw], "options": {"logprob_temperature": -1}})
        packed = client.post("/v1/reweight", json={"groups": [raw], "options": options,
                                                   "encoding_format": "base64"}).json()
    assert body["options"]["return_ref_logprobs"] is True and body["options"]["logprob_temperature"] == 0.9
    for got, want in zip(body["results"][0]["responses"], expected.responses):
        assert got["ref_logprobs"] == pytest.approx(want.ref_logprobs, abs=1e-6)
        assert got["entropy"] == pytest.approx(want.entropy, abs=1e-6)
    assert all("ref_logprobs" not in r and "entropy" not in r for r in plain["results"][0]["responses"])
    assert bad.status_code == 422 and bad.json()["pointer"] == "/options/logprob_temperature"
    from kawhi_client.schema import ResponseResult

    for got, want in zip(packed["results"][0]["responses"], expected.responses):  # base64 float32 on the wire
        assert isinstance(got["ref_logprobs"], str) and isinstance(got["entropy"], str)
        decoded = ResponseResult.model_validate(got)
        assert decoded.ref_logprobs == pytest.approx(want.ref_logprobs, abs=1e-5)
        assert decoded.entropy == pytest.approx(want.entropy, abs=1e-5)
