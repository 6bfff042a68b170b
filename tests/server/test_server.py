"""The HTTP service end to end: real uvicorn, real httpx, the real kawhi-tiny engine.

Redis, SIGTERM and start-up behaviour are in test_server_redis.py and
test_server_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kawhi.pipeline.local import LocalService
from server_fixtures import (
    ServerThread,
    assert_problem,
    b64,
    default_engine,
    example_groups,
    metric,
    png_bytes,
    png_header_only,
    small_group,
)

MiB = 1024 * 1024

# Small limits so every limit can be hit cheaply.
LIMITS = dict(
    max_groups=8,
    max_responses_per_group=8,
    max_tokens_per_response=512,
    max_body_bytes=4 * MiB,
    max_image_bytes=1 * MiB,
    batch_tokens=8192,
)


@pytest.fixture(scope="module")
def server() -> Any:
    with ServerThread(**LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Any:
    with server.client() as c:
        yield c


def post_json(client: httpx.Client, body: Any, **kw: Any) -> httpx.Response:
    """POST with NaN/Infinity allowed (json.dumps's default), as a careless trainer would send them."""
    return client.post(
        "/v1/reweight", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"}, **kw
    )


def in_process(server: ServerThread, groups: list[dict], options: Any = None) -> list[dict]:
    """The engine's own in-process answer for these groups (same model, defaults and limits)."""
    engine = default_engine(server.settings)
    return [r.model_dump(mode="json") for r in LocalService(engine).reweight(copy.deepcopy(groups), options)]


def assert_results_close(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["id"] == w["id"]
        assert g["grid"] == w["grid"] and g["key_tokens"] == w["key_tokens"]
        assert g["selected_tokens"] == w["selected_tokens"]
        assert g.get("error") == w.get("error") is None
        assert len(g["responses"]) == len(w["responses"])
        for rg, rw in zip(g["responses"], w["responses"]):
            assert rg["advantage"] == pytest.approx(rw["advantage"], rel=1e-9, abs=1e-12)
            assert rg["token_weights"] == pytest.approx(rw["token_weights"], rel=1e-6, abs=1e-9)
            assert rg["token_advantages"] == pytest.approx(rw["token_advantages"], rel=1e-6, abs=1e-9)
            assert [(p["char_start"], p["char_end"], p["token_start"], p["token_end"]) for p in rg["paragraphs"]] == [
                (p["char_start"], p["char_end"], p["token_start"], p["token_end"]) for p in rw["paragraphs"]
            ]
            assert [p["weight"] for p in rg["paragraphs"]] == pytest.approx(
                [p["weight"] for p in rw["paragraphs"]], rel=1e-6, abs=1e-9
            )


# ====================================================================== round trip


def test_round_trip_equals_in_process_engine(server: ServerThread, client: httpx.Client) -> None:
    groups = example_groups()
    options = {"temperature": 0.2, "normalize": "mean"}
    r = client.post("/v1/reweight", json={"groups": groups, "options": options})
    assert r.status_code == 200, r.text
    body = r.json()
    engine = server.state.engine
    assert body["model"] == engine.model_name
    assert body["version"]
    assert body["options"] == engine.resolve_options(options).to_dict()
    assert body["usage"]["tokens"] > 0 and body["usage"]["milliseconds"] > 0
    assert_results_close(body["results"], in_process(server, groups, options))
    for res in body["results"]:
        for resp in res["responses"]:  # docs/api.md: token_advantages[i] = advantage * token_weights[i]
            assert resp["token_advantages"] == pytest.approx([resp["advantage"] * w for w in resp["token_weights"]])


def test_empty_response_follows_the_documented_rule(client: httpx.Client) -> None:
    # docs/api.md: an empty response is "handled by the documented rule, never by a crash":
    # the engine keeps its advantage and gives it no tokens to weight.
    g = small_group(40)
    g["responses"][1]["text"] = ""
    r = client.post("/v1/reweight", json={"groups": [g]})
    assert r.status_code == 200, r.text
    empty = r.json()["results"][0]["responses"][1]
    assert empty["token_advantages"] == [] and empty["paragraphs"] == []
    assert math.isfinite(empty["advantage"])


def test_single_response_and_equal_rewards_are_answered(client: httpx.Client) -> None:
    one = small_group(41, n=1)
    equal = small_group(42, n=3)
    for resp in equal["responses"]:
        resp["reward"] = 1.0
    r = client.post("/v1/reweight", json={"groups": [one, equal]})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        assert all(resp["advantage"] == 0.0 for resp in res["responses"])


# ====================================================================== probes, info, docs, metrics


def test_probes_info_docs_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"state": "ready", "reasons": []}

    info = client.get("/v1/info").json()
    for key in ("model", "tokenizer_fingerprint", "heads", "limits", "defaults", "version", "is_demo"):
        assert key in info, key
    assert info["limits"]["max_groups"] == LIMITS["max_groups"]
    assert info["limits"]["max_response_tokens"] == LIMITS["max_tokens_per_response"]
    assert info["defaults"]["temperature"] == 0.1

    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/reweight", "/v1/images", "/v1/info", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "ReweightRequest" in spec["components"]["schemas"]

    text = client.get("/metrics").text
    for name in (
        "kawhi_requests_total",
        "kawhi_request_duration_seconds_bucket",
        "kawhi_queue_depth",
        "kawhi_batch_groups_bucket",
        "kawhi_batch_tokens_bucket",
        "kawhi_forward_seconds_bucket",
        "kawhi_cache_hits_total",
        "kawhi_cache_misses_total",
        "kawhi_redis_degraded",
        "kawhi_errors_total",
    ):
        assert name in text, name
    assert metric(text, "kawhi_requests_total", 'frontend="http",route="/v1/info",status="200"') >= 1


def test_request_id_is_honoured_generated_and_echoed(client: httpx.Client) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "trainer-42.step-7"})
    assert r.headers["x-request-id"] == "trainer-42.step-7"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    insane = client.get("/healthz", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert insane != "bad id with spaces" and len(insane) == 32
    p = client.post("/v1/reweight", content=b"{", headers={"content-type": "application/json", "X-Request-ID": "r-1"})
    assert p.headers["x-request-id"] == "r-1" and p.json()["request_id"] == "r-1"


def test_unknown_route_and_method_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v2/reweight"), 404, "")
    assert_problem(client.get("/v1/reweight"), 405, "")


# ====================================================================== bad input


def _body(mutate: Callable[[dict], Any] | None = None, n_groups: int = 1) -> dict:
    body = {"groups": [small_group(0) for _ in range(n_groups)]}
    if mutate is not None:
        mutate(body)
    return body


def _g(body: dict) -> dict:
    return body["groups"][0]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A mutation that sets a '/'-separated path under group 0 (or the body when it starts with '/')."""

    def mutate(body: dict) -> None:
        parts = path.strip("/").split("/")
        node: Any = body if path.startswith("/") else _g(body)
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()


def _gif() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(out, format="GIF")
    return out.getvalue()


def _nested(body: dict) -> None:
    body["groups"] = [[body["groups"][0]]]


def _both_prompt_and_messages(body: dict) -> None:
    _g(body)["messages"] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]


def _too_many_responses(body: dict) -> None:
    _g(body)["responses"] = [{"text": f"r{i}", "reward": float(i % 2)} for i in range(LIMITS["max_responses_per_group"] + 1)]


def _second_group_bad(body: dict) -> None:
    body["groups"].append(small_group(1))
    body["groups"][1]["responses"][0]["reward"] = float("nan")


BAD_CASES: list[tuple[str, Callable[[], Any], int, str]] = [
    # images
    ("bad base64", lambda: _body(_set("image", {"data": "this is not base64!"})), 422, "/groups/0/image/data"),
    ("truncated PNG", lambda: _body(_set("image", {"data": b64(png_bytes()[:80])})), 422, "/groups/0/image/data"),
    ("1x1 image", lambda: _body(_set("image", {"data": b64(png_bytes(1, 1))})), 422, "/groups/0/image/data"),
    ("20000x20000 image (bomb)", lambda: _body(_set("image", {"data": b64(png_header_only(20000, 20000))})), 413,
     "/groups/0/image/data"),
    ("GIF is not an accepted format", lambda: _body(_set("image", {"data": b64(_gif())})), 422,
     "/groups/0/image/data"),
    ("image bytes over the limit", lambda: _body(_set("image", {"data": b64(b"\0" * (LIMITS["max_image_bytes"] + 10))})),
     413, "/groups/0/image/data"),
    ("unknown sha256", lambda: _body(_set("image", {"sha256": "ab" * 32})), 404, "/groups/0/image/sha256"),
    ("sha256 not hex", lambda: _body(_set("image", {"sha256": "not-a-hash"})), 422, "/groups/0/image/sha256"),
    ("image path is never read", lambda: _body(_set("image", {"path": "/etc/passwd"})), 422, "/groups/0/image/path"),
    ("image with data and sha256", lambda: _body(_set("image", {"data": b64(png_bytes()), "sha256": "ab" * 32})),
     422, "/groups/0/image"),
    ("missing image", lambda: _body(_set("image", _DELETE)), 422, "/groups/0/image"),
    # rewards, advantages
    ("NaN reward", lambda: _body(_set("responses/1/reward", float("nan"))), 422, "/groups/0/responses/1/reward"),
    ("infinite reward", lambda: _body(_set("responses/2/reward", float("inf"))), 422,
     "/groups/0/responses/2/reward"),
    ("missing reward", lambda: _body(_set("responses/1/reward", _DELETE)), 422, "/groups/0/responses/1/reward"),
    ("advantages/responses count mismatch", lambda: _body(_set("advantages", [1.0])), 422, "/groups/0/advantages"),
    ("reward of the wrong type", lambda: _body(_set("responses/0/reward", "high")), 422,
     "/groups/0/responses/0/reward"),
    # responses, tokens
    ("missing text", lambda: _body(_set("responses/0/text", _DELETE)), 422, "/groups/0/responses/0/text"),
    ("null text", lambda: _body(_set("responses/0/text", None)), 422, "/groups/0/responses/0/text"),
    ("token id out of vocabulary", lambda: _body(_set("responses/0/token_ids", [1, 10**6])), 422,
     "/groups/0/responses/0/token_ids/1"),
    ("negative token id", lambda: _body(_set("responses/1/token_ids", [-3])), 422,
     "/groups/0/responses/1/token_ids/0"),
    ("token id of the wrong type", lambda: _body(_set("responses/0/token_ids", ["a"])), 422,
     "/groups/0/responses/0/token_ids/0"),
    ("over-long token_ids", lambda: _body(_set("responses/0/token_ids", [5] * (LIMITS["max_tokens_per_response"] + 1))),
     413, "/groups/0/responses/0/token_ids"),
    ("over-long text", lambda: _body(_set("responses/1/text", "word " * 4000)), 413, "/groups/0/responses/1/text"),
    ("too many responses", lambda: _body(_too_many_responses), 413, "/groups/0/responses"),
    ("no responses", lambda: _body(_set("responses", [])), 422, "/groups/0/responses"),
    ("responses not a list", lambda: _body(_set("responses", {"text": "a", "reward": 1})), 422,
     "/groups/0/responses"),
    # structure
    ("extra nesting of groups", lambda: _body(_nested), 422, "/groups/0"),
    ("extra nesting of image data", lambda: _body(_set("image", {"data": {"data": b64(png_bytes())}})), 422,
     "/groups/0/image/data"),
    ("unknown field", lambda: _body(_set("colour", "red")), 422, "/groups/0/colour"),
    ("prompt and messages both", lambda: _body(_both_prompt_and_messages), 422, "/groups/0"),
    ("messages of a bad shape", lambda: _body(lambda b: (_g(b).pop("prompt"), _g(b).update(
        messages=[{"role": "user", "content": 5}]))), 422, "/groups/0/messages"),
    ("no groups", lambda: {"groups": []}, 422, "/groups"),
    ("too many groups", lambda: _body(n_groups=LIMITS["max_groups"] + 1), 413, "/groups"),
    ("a later group is the bad one", lambda: _body(_second_group_bad), 422, "/groups/1/responses/0/reward"),
    ("body is not an object", lambda: [small_group(0)], 422, ""),
    # options
    ("option out of range", lambda: _body(_set("/options", {"temperature": 0})), 422, "/options/temperature"),
    ("unknown option", lambda: _body(_set("/options", {"colour": 1})), 422, "/options/colour"),
    ("head index out of range", lambda: _body(_set("/options", {"heads": [99]})), 422, "/options/heads"),
    ("w_min above w_max", lambda: _body(_set("/options", {"w_min": 2.0})), 422, "/options/w_min"),
    ("estimator of the wrong type", lambda: _body(_set("/options", {"estimator": 3})), 422, "/options/estimator"),
]


@pytest.mark.parametrize("name,make,status,pointer", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_problem_with_pointer(
    server: ServerThread, client: httpx.Client, name: str, make: Callable[[], Any], status: int, pointer: str
) -> None:
    before = metric(client.get("/metrics").text, "kawhi_groups_total")
    body = assert_problem(post_json(client, make()), status, pointer)
    assert body["detail"], body
    if status == 404:
        assert "ab" * 32 in body["detail"]
    # refused on arrival: nothing reached the forward, no queue slot is left held
    after = client.get("/metrics").text
    assert metric(after, "kawhi_groups_total") == before
    assert metric(after, "kawhi_queue_depth") == 0


def test_bad_input_count() -> None:
    assert len(BAD_CASES) >= 20


def test_malformed_json_wrong_media_type_and_oversized_body(server: ServerThread, client: httpx.Client) -> None:
    assert_problem(client.post("/v1/reweight", content=b'{"groups": [', headers={"content-type": "application/json"}),
                   400, "")
    assert_problem(client.post("/v1/reweight", content=b"", headers={"content-type": "application/json"}), 400, "")
    assert_problem(client.post("/v1/reweight", content=b"groups", headers={"content-type": "text/plain"}), 415, "")
    big = b'{"groups": "' + b"x" * (LIMITS["max_body_bytes"] + 1) + b'"}'
    body = assert_problem(client.post("/v1/reweight", content=big, headers={"content-type": "application/json"}),
                          413, "")
    assert str(LIMITS["max_body_bytes"]) in body["detail"]

    # without a Content-Length (chunked): counted while it streams, refused all the same
    def chunks() -> Any:
        yield b'{"groups": "'
        for _ in range(5):
            yield b"x" * MiB
        yield b'"}'

    assert_problem(client.post("/v1/reweight", content=chunks(), headers={"content-type": "application/json"}),
                   413, "")


def test_per_group_errors_keep_the_good_groups(server: ServerThread, client: httpx.Client) -> None:
    good = small_group(50)
    nan = small_group(51)
    nan["responses"][1]["reward"] = float("nan")
    wrong_type = small_group(52)
    wrong_type["responses"][0]["reward"] = "high"
    unknown = small_group(53)
    unknown["image"] = {"sha256": "cd" * 32}
    r = post_json(client, {"groups": [good, nan, wrong_type, unknown], "per_group_errors": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["id"] for x in res] == ["g50", "g51", "g52", "g53"]
    assert res[0]["error"] is None
    assert_results_close([res[0]], in_process(server, [good]))
    assert res[1]["error"]["pointer"] == "/groups/1/responses/1/reward" and res[1]["error"]["status"] == 422
    assert res[2]["error"]["pointer"] == "/groups/2/responses/0/reward" and res[2]["error"]["status"] == 422
    assert res[3]["error"]["pointer"] == "/groups/3/image/sha256" and res[3]["error"]["status"] == 404
    # the same request without per_group_errors fails as a whole, at the first bad group
    assert_problem(post_json(client, {"groups": [good, nan]}), 422, "/groups/1/responses/1/reward")


# ====================================================================== images by hash


def test_upload_raw_and_multipart_then_reference_by_hash(server: ServerThread, client: httpx.Client) -> None:
    data = png_bytes(64, 48, seed=7)
    raw = client.post("/v1/images", content=data, headers={"content-type": "image/png"})
    assert raw.status_code == 200, raw.text
    sha = raw.json()["sha256"]
    import hashlib

    assert sha == hashlib.sha256(data).hexdigest()
    assert raw.json()["width"] == 64 and raw.json()["height"] == 48
    multi = client.post("/v1/images", files={"file": ("x.png", data, "image/png")})
    assert multi.status_code == 200 and multi.json()["sha256"] == sha

    by_data = small_group(60, image=data)
    by_hash = copy.deepcopy(by_data)
    by_hash["image"] = {"sha256": sha.upper()}  # hex case does not matter
    by_hash["responses"][0]["reward"] = 0.5  # a different request, so not an idempotent replay
    r = client.post("/v1/reweight", json={"groups": [by_hash]})
    assert r.status_code == 200, r.text
    assert_results_close(r.json()["results"], in_process(server, [{**by_hash, "image": by_data["image"]}]))

    # an image sent inline is held too: the next request may send just its hash
    inline = png_bytes(60, 60, seed=8)
    assert client.post("/v1/reweight", json={"groups": [small_group(61, image=inline)]}).status_code == 200
    again = small_group(62)
    again["image"] = {"sha256": hashlib.sha256(inline).hexdigest()}
    assert client.post("/v1/reweight", json={"groups": [again]}).status_code == 200


def test_bad_uploads(client: httpx.Client) -> None:
    assert_problem(client.post("/v1/images", content=png_bytes()[:70], headers={"content-type": "image/png"}), 422, "")
    assert_problem(client.post("/v1/images", content=b""), 422, "")
    bomb = client.post("/v1/images", content=png_header_only(20000, 20000), headers={"content-type": "image/png"})
    assert_problem(bomb, 413, "")
    assert_problem(client.post("/v1/images", content=b"\0" * (LIMITS["max_image_bytes"] + 1)), 413, "")
    assert_problem(client.post("/v1/images", files={"upload": ("x.png", png_bytes(1, 1), "image/png")}), 422,
                   "/upload")


# ====================================================================== idempotency


def test_idempotent_retry_is_served_from_the_cache(client: httpx.Client) -> None:
    body = {"groups": [small_group(70), small_group(71)], "options": {"seed": 3}}
    first = client.post("/v1/reweight", json=body)
    assert first.status_code == 200 and first.headers["x-kawhi-cache"] == "miss"
    m = client.get("/metrics").text
    forwards, hits = metric(m, "kawhi_groups_total"), metric(m, "kawhi_cache_hits_total", 'kind="result"')

    retry = client.post("/v1/reweight", json=body)
    assert retry.status_code == 200 and retry.headers["x-kawhi-cache"] == "hit"
    assert retry.content == first.content  # the stored answer, byte for byte
    # key order and an explicit default do not make a different request
    reordered = {"options": {"seed": 3, "temperature": 0.1}, "groups": body["groups"]}
    assert client.post("/v1/reweight", json=reordered).headers["x-kawhi-cache"] == "hit"
    m = client.get("/metrics").text
    assert metric(m, "kawhi_groups_total") == forwards  # no forward for the retries
    assert metric(m, "kawhi_cache_hits_total", 'kind="result"') >= hits + 2

    changed = client.post("/v1/reweight", json={**body, "options": {"seed": 4}})
    assert changed.headers["x-kawhi-cache"] == "miss"


def test_concurrent_identical_requests_share_one_computation(server: ServerThread) -> None:
    body = {"groups": [small_group(s) for s in range(80, 84)]}

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/reweight", json=body) for _ in range(4)))

    before = metric(httpx.get(server.url + "/metrics").text, "kawhi_groups_total")
    rs = asyncio.run(main())
    assert all(r.status_code == 200 for r in rs)
    assert len({r.content for r in rs}) == 1
    assert metric(httpx.get(server.url + "/metrics").text, "kawhi_groups_total") == before + 4


# ====================================================================== load


def test_32_concurrent_clients_are_all_answered_and_batched(server: ServerThread) -> None:
    groups = [small_group(100 + i, n=2 + i % 3) for i in range(32)]

    async def one(g: dict) -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:  # one connection per client
            return await c.post("/v1/reweight", json={"groups": [g]}, headers={"X-Request-ID": g["id"]})

    async def main() -> list[httpx.Response]:
        return await asyncio.gather(*(one(g) for g in groups))

    before = httpx.get(server.url + "/metrics").text
    rs = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 32, [r.text[:200] for r in rs if r.status_code != 200]
    assert [r.headers["x-request-id"] for r in rs] == [g["id"] for g in groups]
    got = [r.json()["results"][0] for r in rs]
    assert_results_close(got, in_process(server, groups))
    after = httpx.get(server.url + "/metrics").text
    n_batches = metric(after, "kawhi_batch_groups_count") - metric(before, "kawhi_batch_groups_count")
    n_groups = metric(after, "kawhi_batch_groups_sum") - metric(before, "kawhi_batch_groups_sum")
    assert n_groups == 32
    assert n_batches < 32, "concurrent requests should share forwards"
    assert metric(after, "kawhi_queue_depth") == 0


def test_tiny_queue_answers_429_with_retry_after_and_loses_nothing() -> None:
    with ServerThread(queue_groups=2, batch_wait_ms=20) as s:
        groups = [small_group(200 + i) for i in range(12)]
        refusals: list[httpx.Response] = []

        async def one(c: httpx.AsyncClient, g: dict) -> httpx.Response:
            for _ in range(100):
                r = await c.post("/v1/reweight", json={"groups": [g]})
                if r.status_code != 429:
                    return r
                refusals.append(r)
                await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0))
            return r

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60, limits=httpx.Limits(max_connections=32)) as c:
                return await asyncio.gather(*(one(c, g) for g in groups))

        rs = asyncio.run(main())
        assert refusals, "a queue of 2 groups must refuse some of 12 concurrent requests"
        for r in refusals:
            assert_problem(r, 429, "")
            assert int(r.headers["retry-after"]) >= 1
        assert [r.status_code for r in rs] == [200] * 12  # every request answered in the end
        assert [r.json()["results"][0]["id"] for r in rs] == [g["id"] for g in groups]
        m = httpx.get(s.url + "/metrics").text
        assert metric(m, "kawhi_errors_total", 'type="queue-full"') == len(refusals)
        assert metric(m, "kawhi_requests_total", 'frontend="http",route="/v1/reweight",status="429"') == len(refusals)
        assert metric(m, "kawhi_queue_depth") == 0


def test_group_larger_than_the_batch_budget_is_refused_on_arrival() -> None:
    with ServerThread(batch_tokens=300) as s, s.client() as c:
        body = assert_problem(c.post("/v1/reweight", json={"groups": [example_groups()[0]]}), 413, None)
        assert body["pointer"].startswith("/groups/0")
        m = c.get("/metrics").text
        assert metric(m, "kawhi_groups_total") == 0 and metric(m, "kawhi_queue_depth") == 0


def test_request_deadline_answers_504_and_frees_the_queue() -> None:
    with ServerThread(request_timeout_s=0.05) as s, s.client() as c:
        groups = example_groups() * 2
        for i, g in enumerate(groups):
            g["id"] = f"slow-{i}"
        assert_problem(c.post("/v1/reweight", json={"groups": groups}), 504, "")
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, "kawhi_queue_depth") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 200


def test_the_callers_deadline_header_bounds_reweight_and_explain() -> None:
    """X-Request-Timeout tightens the server's deadline (120 s here) for that request only,
    queue included, on /v1/reweight and /v1/explain alike; a bad value is a 422."""
    with ServerThread() as s, s.client() as c:
        groups = example_groups() * 2
        for i, g in enumerate(groups):
            g["id"] = f"caller-{i}"
        headers = {"x-request-timeout": "0.05"}
        assert_problem(c.post("/v1/reweight", json={"groups": groups}, headers=headers), 504, "")
        assert_problem(c.post("/v1/explain", json={"groups": groups[:1]}, headers=headers), 504, "")
        for bad in ("soon", "-1", "0", "inf", "nan"):
            assert_problem(c.post("/v1/reweight", json={"groups": groups[:1]},
                                  headers={"x-request-timeout": bad}), 422, "")
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, "kawhi_queue_depth") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok = c.post("/v1/reweight", json={"groups": [small_group(5)]}, headers={"x-request-timeout": "60"})
        assert ok.status_code == 200, ok.text


# ====================================================================== auth


def test_auth_on() -> None:
    with ServerThread(api_keys="key-one, key-two") as s, s.client() as c:
        body = {"groups": [small_group(300)]}
        missing = assert_problem(c.post("/v1/reweight", json=body), 401, "")
        wrong = assert_problem(c.post("/v1/reweight", json=body, headers={"Authorization": "Bearer key-three"}), 401, "")
        basic = assert_problem(c.post("/v1/reweight", json=body, headers={"Authorization": "Basic a2V5LW9uZQ=="}),
                               401, "")
        for p in (missing, wrong, basic):  # 401 says nothing more
            assert p["detail"] == "" and set(p) == {"type", "title", "status", "detail", "pointer", "request_id"}
        assert c.post("/v1/reweight", json=body).headers["www-authenticate"] == "Bearer"
        ok = c.post("/v1/reweight", json=body, headers={"Authorization": "Bearer key-two"})
        assert ok.status_code == 200, ok.text
        assert_problem(c.get("/v1/info"), 401, "")
        assert_problem(c.post("/v1/images", content=png_bytes()), 401, "")
        assert c.get("/v1/info", headers={"Authorization": "Bearer key-one"}).json()["server"]["auth"] is True
        # probes and metrics stay open
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_auth_off(client: httpx.Client) -> None:
    r = client.get("/v1/info", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200 and r.json()["server"]["auth"] is False
