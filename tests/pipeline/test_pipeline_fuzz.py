"""Hostile input over real HTTP: never a 5xx, always problem+json with a pointer, only finite numbers in a 200.

Two parts: hand-written raw bodies (the JSON classes of the boundary: depth, NaN,
overflow, surrogates, UTF-8, digits, media type) and hypothesis-driven mutation of a
valid request (a value replaced, a member deleted, an option set to a hostile value).
Bounded: FUZZ_EXAMPLES requests against one in-thread server with kawhi-tiny.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kawhi.errors import CATALOGUE
from kawhi_client.options import OPTIONS, SGUF_OPTIONS
from server_fixtures import ServerThread, small_group

FUZZ_EXAMPLES = 150


@pytest.fixture(scope="module")
def server() -> Any:
    with ServerThread(max_groups=4, max_responses_per_group=8, max_tokens_per_response=256,
                      max_body_bytes=2 << 20, max_image_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Any:
    with server.client() as c:
        yield c


def _numbers_finite(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_numbers_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_numbers_finite(v) for v in value.values())
    return False


def check_answer(resp: httpx.Response) -> None:
    """The invariants of the boundary, for any request."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:400])
    if resp.status_code == 200:
        def refuse(name: str) -> Any:
            raise AssertionError(f"{name} in a 200")
        body = json.loads(resp.text, parse_constant=refuse)
        assert _numbers_finite(body)
        for result in body["results"]:
            for r in result.get("responses", []):
                numbers = [r["advantage"], *r["token_advantages"], *r["token_weights"]]
                numbers += [v for p in r["paragraphs"] for v in (p["alpha"], p["weight"])]
                assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers), r
        return
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    problem = resp.json()
    assert isinstance(problem.get("pointer"), str) and problem["detail"], problem
    assert problem["type"].rsplit("/", 1)[-1] in CATALOGUE, problem
    assert "0x7f" not in problem["detail"] and "Traceback" not in problem["detail"], problem


def _post(client: httpx.Client, body: bytes, ctype: str | None = "application/json") -> httpx.Response:
    headers = {"content-type": ctype} if ctype else {}
    return client.post("/v1/reweight", content=body, headers=headers)


def _valid() -> dict:
    return {"groups": [small_group(3)]}


def _raw_reward(literal: str) -> bytes:
    text = json.dumps(_valid())
    return text.replace('"reward": 1.0', f'"reward": {literal}', 1).encode()


RAW_CASES: list[tuple[str, bytes, str | None, int, str | None]] = [
    ("nested 1000 deep", b'{"groups": ' + b"[" * 1000 + b"]" * 1000 + b"}", "application/json", 400, ""),
    ("nested 200 deep in a group", json.dumps({"groups": [{**small_group(1), "extra": [[[0]]]}]}).replace(
        "[[[0]]]", "[" * 200 + "]" * 200).encode(), "application/json", 400, None),
    ("NaN literal", _raw_reward("NaN"), "application/json", 422, "/groups/0/responses/0/reward"),
    ("-Infinity literal", _raw_reward("-Infinity"), "application/json", 422, "/groups/0/responses/0/reward"),
    ("1e309 overflows", _raw_reward("1e309"), "application/json", 422, "/groups/0/responses/0/reward"),
    ("-1e309 overflows", _raw_reward("-1e309"), "application/json", 422, "/groups/0/responses/0/reward"),
    ("5000-digit integer", _raw_reward("9" * 5000), "application/json", 400, ""),
    ("huge integer reward", _raw_reward("1" + "0" * 400), "application/json", 422, "/groups/0/responses/0/reward"),
    ("invalid UTF-8", json.dumps(_valid()).encode().replace(b'"text": "', b'"text": "\xff\xfe', 1),
     "application/json", 400, ""),
    ("lone surrogate escape", json.dumps(_valid()).replace('"text": "', '"text": "\\ud800', 1).encode(),
     "application/json", 422, "/groups/0/responses/0/text"),
    ("surrogate in a member name", json.dumps({"groups": [small_group(1)], "\ud800": 1}).encode(),
     "application/json", 422, ""),
    ("no content-type", json.dumps(_valid()).encode(), None, 415, ""),
    ("text/plain", json.dumps(_valid()).encode(), "text/plain", 415, ""),
    ("form content-type", b"groups=1", "application/x-www-form-urlencoded", 415, ""),
    ("empty body", b"", "application/json", 400, ""),
    ("BOM", b"\xef\xbb\xbf" + json.dumps(_valid()).encode(), "application/json", 400, ""),
    ("truncated JSON", json.dumps(_valid()).encode()[:-3], "application/json", 400, ""),
    ("per_group_errors as text", json.dumps({**_valid(), "per_group_errors": "yes"}).encode(), "application/json",
     422, "/per_group_errors"),
    ("groups as an object", b'{"groups": {"a": 1}}', "application/json", 422, "/groups"),
    ("top-level null", b"null", "application/json", 422, ""),
]


@pytest.mark.parametrize("name,body,ctype,status,pointer", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_raw_bodies(client: httpx.Client, name: str, body: bytes, ctype: str | None, status: int,
                    pointer: str | None) -> None:
    resp = _post(client, body, ctype)
    check_answer(resp)
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    if pointer is not None:
        assert resp.json()["pointer"] == pointer, resp.json()


def test_huge_but_finite_rewards_give_the_right_advantages(client: httpx.Client) -> None:
    """Centre, then scale: rewards near the float range give the advantages of small ones."""
    answers = []
    for scale in (1.0, 1e155, 1e300, 1e307):
        body = _valid()
        for j, r in enumerate(body["groups"][0]["responses"]):
            r["reward"] = [1.0, -1.0, 0.5][j] * scale
        resp = _post(client, json.dumps({**body, "options": {"eps": 0.0}}).encode())  # eps does not scale
        check_answer(resp)
        assert resp.status_code == 200, resp.text[:300]
        answers.append([r["advantage"] for r in resp.json()["results"][0]["responses"]])
    for got in answers[1:]:
        assert got == pytest.approx(answers[0], rel=1e-9)
    overflowing = _valid()
    for j, r in enumerate(overflowing["groups"][0]["responses"]):
        r["reward"] = [1.7e308, -1.7e308, 1.7e308][j]  # R - mean = -2.3e308
    resp = _post(client, json.dumps({**overflowing, "options": {"estimator": "drgrpo"}}).encode())
    check_answer(resp)
    assert resp.status_code == 422 and resp.json()["pointer"].startswith("/groups/0/responses/"), resp.text[:300]


# ---------------------------------------------------------------------- mutation fuzzing

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1e308, max_value=1e308),
    st.sampled_from(["", "yes", "1.0", "NaN", "\ud800", "\udfff x", "preset", "all", "mean", "a" * 3000]),
    st.text(max_size=12), st.lists(st.integers(min_value=-5, max_value=10**7), max_size=4),
    st.lists(st.floats(allow_nan=True), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            out += _paths(v, prefix + (i,))
    return out


BASE = {"groups": [small_group(5, n=3)], "options": {"temperature": 0.1}}
BASE["groups"][0]["image"]["data"] = BASE["groups"][0]["image"]["data"]  # inline PNG
PATHS = [p for p in _paths(BASE) if p[:3] != ("groups", 0, "image") or len(p) <= 4]
OPTION_NAMES = [o.name for o in OPTIONS] + [f"sguf.{o.name}" for o in SGUF_OPTIONS]


@st.composite
def mutated_requests(draw: Any) -> dict:
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(OPTION_NAMES))
            value = draw(HOSTILE)
            target = doc.setdefault("options", {})
            if name.startswith("sguf.") and isinstance(target, dict):
                target, name = target.setdefault("sguf", {}), name[5:]
            if isinstance(target, dict):  # else an earlier mutation replaced the object: keep that one
                target[name] = value
            continue
        path = draw(st.sampled_from(PATHS))
        target = doc
        try:
            for p in path[:-1]:
                target = target[p]
            if draw(st.integers(0, 4)) == 0 and isinstance(target, dict):
                target.pop(path[-1], None)
            else:
                target[path[-1]] = draw(HOSTILE)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the parent
    doc["per_group_errors"] = draw(st.booleans())
    return doc


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(doc=mutated_requests())
def test_mutated_requests_never_5xx(client: httpx.Client, doc: dict) -> None:
    body = json.dumps(doc, allow_nan=True).encode()  # NaN/Infinity literals, \ud800 escapes
    resp = _post(client, body)
    check_answer(resp)
    if resp.status_code == 200 and doc.get("per_group_errors"):
        for result in resp.json()["results"]:
            if result.get("error"):
                assert result["error"]["pointer"].startswith("/groups/"), result
