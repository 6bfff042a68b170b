"""Compact answers over real HTTP: base64 float32 arrays, no arrays, gzip; the prefix
cache's counters on /metrics; the client decodes transparently."""

from __future__ import annotations

import base64
import struct
from typing import Any

import pytest
from kawhi_client.arrays import decode_float32, encode_float32, token_weights_from_paragraphs
from kawhi_client.client import Client
from kawhi_client.schema import ResponseResult
from server_fixtures import ServerThread, metric, small_group


@pytest.fixture(scope="module")
def server() -> Any:
    with ServerThread(batch_tokens=8192) as s:
        yield s


def post(server: ServerThread, body: dict, **headers: str) -> Any:
    with server.client() as c:
        return c.post("/v1/reweight", json=body, headers=headers)


def test_float32_codec_round_trips_little_endian():
    values = [0.0, -1.5, 3.25, 1e-7, 12345.678]
    text = encode_float32(values)
    assert base64.b64decode(text) == struct.pack("<5f", *values)
    assert decode_float32(text) == pytest.approx(values, rel=1e-7)
    assert decode_float32(text, as_numpy=True).dtype.name == "float32"
    for bad in ("not base64!", base64.b64encode(b"abc").decode()):
        with pytest.raises(ValueError):
            decode_float32(bad)
    model = ResponseResult.model_validate({"advantage": 1, "paragraphs": [], "token_advantages": text,
                                           "token_weights": values})
    assert model.token_advantages == pytest.approx(values, rel=1e-7)


def test_base64_answer_carries_the_same_values_in_fewer_bytes(server):
    group = small_group(seed=41, n=3)
    plain = post(server, {"groups": [group]})
    packed = post(server, {"groups": [group], "encoding_format": "base64"})
    assert plain.status_code == packed.status_code == 200
    assert packed.headers["x-kawhi-cache"] == "miss"  # its own idempotency key, not the float answer
    a, b = plain.json()["results"][0]["responses"], packed.json()["results"][0]["responses"]
    for x, y in zip(a, b):
        for name in ("token_advantages", "token_weights"):
            assert isinstance(y[name], str)
            assert decode_float32(y[name]) == pytest.approx(x[name], rel=1e-6, abs=1e-7)
        assert x["paragraphs"] == y["paragraphs"]
    values = sum(len(x["token_weights"]) * 2 for x in a)
    assert values > 0 and len(packed.content) < len(plain.content)


def test_token_arrays_false_leaves_them_out_and_paragraphs_rebuild_them(server):
    group = small_group(seed=42, n=2)
    full = post(server, {"groups": [group]}).json()["results"][0]["responses"]
    bare = post(server, {"groups": [group], "token_arrays": False}).json()["results"][0]["responses"]
    for x, y in zip(full, bare):
        assert "token_advantages" not in y and "token_weights" not in y
        assert token_weights_from_paragraphs(y, len(x["token_weights"])) == pytest.approx(x["token_weights"])


def test_bad_wire_fields_are_422_with_a_pointer(server):
    for body, where in (({"encoding_format": "fp16"}, "/encoding_format"), ({"token_arrays": "no"}, "/token_arrays")):
        resp = post(server, {"groups": [small_group(seed=43)], **body})
        assert resp.status_code == 422 and resp.json()["pointer"] == where


def test_gzip_when_the_client_accepts_it(server):
    body = {"groups": [small_group(seed=44, n=4)]}
    with server.client() as c:
        raw = c.post("/v1/reweight", json=body, headers={"accept-encoding": "identity"})
        zipped = c.post("/v1/reweight", json=body, headers={"accept-encoding": "gzip"})
    assert len(raw.content) >= server.settings.gzip_min_bytes  # big enough to be compressed
    assert "content-encoding" not in raw.headers
    assert zipped.headers["content-encoding"] == "gzip"
    assert int(zipped.headers["content-length"]) < len(raw.content)
    assert zipped.json() == raw.json()  # httpx inflates it


def test_client_decodes_base64_transparently(server):
    groups = [small_group(seed=45, n=3)]
    with Client(server.url, wait_ready=False) as plain, \
            Client(server.url, wait_ready=False, encoding_format="base64") as packed, \
            Client(server.url, wait_ready=False, token_arrays=False) as bare:
        a, b, c = plain.reweight(groups)[0], packed.reweight(groups)[0], bare.reweight(groups)[0]
    for x, y, z in zip(a.responses, b.responses, c.responses):
        assert isinstance(y.token_advantages, list)
        assert y.token_advantages == pytest.approx(x.token_advantages, rel=1e-6, abs=1e-7)
        assert y.token_weights == pytest.approx(x.token_weights, rel=1e-6, abs=1e-7)
        assert z.token_advantages is None and z.paragraphs == x.paragraphs
    with pytest.raises(ValueError):
        Client(server.url, wait_ready=False, encoding_format="fp16")


def test_prefix_cache_counters_on_metrics(server):
    group = small_group(seed=46, n=2)
    singles = [{**group, "responses": [r], "advantages": None} for r in group["responses"]]
    with server.client() as c:
        before = c.get("/metrics").text
        for single in singles:
            assert c.post("/v1/reweight", json={"groups": [single]}).status_code == 200
        after = c.get("/metrics").text
    hits = metric(after, "kawhi_prefix_cache_hits_total") - metric(before, "kawhi_prefix_cache_hits_total")
    misses = metric(after, "kawhi_prefix_cache_misses_total") - metric(before, "kawhi_prefix_cache_misses_total")
    assert (misses, hits) == (1, len(singles) - 1)
    assert metric(after, "kawhi_prefix_cache_bytes") > 0
    assert metric(after, "kawhi_prefix_cache_max_bytes") == server.settings.cache_prefix_bytes


def test_concurrent_single_response_requests_compute_their_prefix_once(server):
    """A group sent as concurrent one-response requests (verl's one call per sample):
    whichever batches they land in, the prefix is computed once."""
    import asyncio

    import httpx

    group = small_group(seed=47, n=5)
    singles = [{**group, "id": f"s{i}", "responses": [r], "advantages": [1.0]} for i, r in enumerate(group["responses"])]

    async def send() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            answers = await asyncio.gather(*[c.post("/v1/reweight", json={"groups": [s]}) for s in singles])
        return [a.status_code for a in answers]

    with server.client() as c:
        before = c.get("/metrics").text
        assert asyncio.run(send()) == [200] * 5
        after = c.get("/metrics").text
    misses = metric(after, "kawhi_prefix_cache_misses_total") - metric(before, "kawhi_prefix_cache_misses_total")
    assert misses == 1


def test_reference_logprobs_travel_base64_too(server):
    group = small_group(seed=48, n=2)
    options = {"return_ref_logprobs": True, "return_entropy": True}
    plain = post(server, {"groups": [group], "options": options})
    packed = post(server, {"groups": [group], "options": options, "encoding_format": "base64"})
    assert plain.status_code == packed.status_code == 200, plain.text
    for x, y in zip(plain.json()["results"][0]["responses"], packed.json()["results"][0]["responses"]):
        for name in ("ref_logprobs", "entropy"):
            assert isinstance(y[name], str)
            assert decode_float32(y[name]) == pytest.approx(x[name], rel=1e-6, abs=1e-6)
