"""The same bad groups through every front end give the same error type and pointer.

Each row is a valid group with one planted mistake. In-process (LocalService.reweight),
`kawhi reweight` and `kawhi explain` point relative to the group; HTTP and gRPC prefix
``/groups/<i>``. One HTTP request, one gRPC request (per_group_errors) and one run of
each CLI command carry every row, so the table stays fast. gRPC carries every row its
message types can hold; the others (a reward sent as text, an unknown field, ...)
cannot be written into a kawhi.v1 message at all, so the client refuses them before
sending (listed in UNREPRESENTABLE, and checked to be refused).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from grpc_fixtures import GrpcServerThread
from kawhi.pipeline.local import LocalService
from server_fixtures import ROOT, b64, default_engine, png_bytes, small_group, subprocess_env

# The CLI has no limit flags: every front end runs with the default limits here.


def _image(width: int, height: int) -> dict:
    return {"data": b64(png_bytes(width, height))}


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(group: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        target = group
        for p in parents:
            target = target[p]
        target[last] = value
    return mutate


def _gif() -> dict:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32)).save(out, format="GIF")
    return {"data": b64(out.getvalue())}


# (name, mutation, type slug, pointer relative to the group)
ROWS: list[tuple[str, Callable[[dict], None], str, str]] = [
    ("NaN reward", _set("responses/1/reward", float("nan")), "validation", "/responses/1/reward"),
    ("infinite reward", _set("responses/0/reward", float("inf")), "validation", "/responses/0/reward"),
    ("reward as text", _set("responses/1/reward", "1.0"), "validation", "/responses/1/reward"),
    ("reward as bool", _set("responses/2/reward", True), "validation", "/responses/2/reward"),
    ("missing reward", lambda g: g["responses"][1].pop("reward"), "invalid-group", "/responses/1/reward"),
    ("advantages count", _set("advantages", [1.0]), "invalid-group", "/advantages"),
    ("non-finite advantage", _set("advantages", [1.0, float("-inf"), 0.0]), "validation", "/advantages/1"),
    ("token id out of vocabulary", _set("responses/0/token_ids", [1, 10**6]), "invalid-group",
     "/responses/0/token_ids/1"),
    ("negative token id", _set("responses/0/token_ids", [-3]), "invalid-group", "/responses/0/token_ids/0"),
    ("fractional token id", _set("responses/0/token_ids", [1.5]), "validation", "/responses/0/token_ids/0"),
    ("token id as text", _set("responses/0/token_ids", ["7"]), "validation", "/responses/0/token_ids/0"),
    ("lone surrogate in text", _set("responses/0/text", "bad \ud800 text"), "validation", "/responses/0/text"),
    ("lone surrogate in prompt", _set("prompt", "\udfff"), "validation", "/prompt"),
    ("aspect ratio 3000x14", _set("image", _image(3000, 14)), "invalid-image", "/image/data"),
    ("1x1 image", _set("image", _image(1, 1)), "invalid-image", "/image/data"),
    ("truncated PNG", _set("image", {"data": b64(png_bytes(64, 64)[:90])}), "invalid-image", "/image/data"),
    ("GIF", _set("image", _gif()), "invalid-image", "/image/data"),
    ("bad base64", _set("image", {"data": "not base64 !!"}), "invalid-image", "/image/data"),
    ("image data and sha256", _set("image", {"data": "AAAA", "sha256": "ab" * 32}), "validation", "/image"),
    ("unknown field", _set("colour", "red"), "validation", "/colour"),
    ("image URL", _set("image", {"url": "https://example.com/a.png"}), "path-not-allowed", "/image/url"),
    ("no responses", _set("responses", []), "validation", "/responses"),
    ("prompt and messages", _set("messages", [{"role": "user", "content": "hi"}]), "validation", ""),
    ("messages without an image", lambda g: (g.pop("prompt"), g.update(messages=[{"role": "user", "content": "x"}])),
     "invalid-group", "/messages"),
    ("too many responses", lambda g: g.update(responses=g["responses"] * 22), "too-large", "/responses"),
    ("over-long token_ids", _set("responses/0/token_ids", [5] * 8193), "too-large", "/responses/0/token_ids"),
    ("over-long text", _set("responses/1/text", "word " * 110000), "too-large", "/responses/1/text"),
    ("group not an object", lambda g: None, "validation", ""),  # replaced by a list below
]


# rows a kawhi.v1 message cannot hold (the proto's types or its image oneof), refused by the client
UNREPRESENTABLE = {
    "reward as text", "reward as bool", "fractional token id", "token id as text", "lone surrogate in text",
    "lone surrogate in prompt", "bad base64", "image data and sha256", "unknown field", "group not an object",
    "image URL",  # the proto's image is a oneof of data / sha256 / path: a url has no field
}


def _grpc_message(group: Any) -> Any:
    """The group as a kawhi.v1 RolloutGroup, or None when the message types cannot hold it."""
    from kawhi_client.grpc import convert

    if not isinstance(group, dict) or set(group) - {"id", "image", "prompt", "messages", "responses", "advantages"}:
        return None
    image = group.get("image") or {}
    if len([k for k in ("data", "sha256", "path") if image.get(k) is not None]) != 1:
        return None
    for r in group.get("responses") or ():
        if isinstance(r.get("reward"), (bool, str)):
            return None
    try:
        message = convert.group_to_message(group)
        message.SerializeToString()
    except (ValueError, TypeError):  # a token id that is not an int, a lone surrogate, bad base64
        return None
    return message


def _explain_errors(stderr: str, n: int) -> dict[int, tuple[str, str]]:
    """`kawhi explain`'s one line per failed group -> {line number: (type slug, pointer)}."""
    import re

    from kawhi.errors import CATALOGUE

    slug_of = {kind.title: slug for slug, kind in CATALOGUE.items()}
    out = {}
    for line in stderr.splitlines():
        match = re.match(r"kawhi: line (\d+) \(.*?\): (.+)$", line)
        if not match:
            continue
        rest = match.group(2)
        title = next(t for t in sorted(slug_of, key=len, reverse=True) if rest.startswith(t))
        after = rest[len(title):]
        pointer = after[4:after.index(": ")] if after.startswith(" at ") else ""
        out[int(match.group(1))] = (slug_of[title], pointer)
    return out


def _bad_groups() -> list[Any]:
    groups = []
    for i, (name, mutate, _, _) in enumerate(ROWS):
        group = small_group(100 + i)
        group["id"] = name
        if name == "group not an object":
            groups.append([group])
            continue
        mutate(group)
        groups.append(group)
    return groups


def _slug(problem: dict) -> str:
    return problem["type"].rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def server() -> Any:
    with GrpcServerThread() as s:  # HTTP and gRPC over one service
        yield s


def test_every_front_end_agrees(server: GrpcServerThread, tmp_path) -> None:
    groups = _bad_groups() + [small_group(7)]
    # in-process (same model, defaults and limits as the server)
    engine = default_engine(server.settings)
    local = [r.model_dump(mode="json") for r in LocalService(engine).reweight(copy.deepcopy(groups))]
    # HTTP, one request with per-group errors
    body = json.dumps({"groups": groups, "per_group_errors": True}, allow_nan=True)  # NaN/Infinity literals
    with server.client() as client:
        r = client.post("/v1/reweight", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text[:500]
    remote = r.json()["results"]
    # CLI, one group per line, the same model (the default, kawhi-tiny) and limits as the server
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(g, allow_nan=True) + "\n" for g in groups))
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "kawhi.cli", "reweight", str(src), "-o", str(out), "-q"],
                         capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    cli = [json.loads(line) for line in out.read_text().splitlines()]
    # kawhi explain, the same file
    run = subprocess.run([sys.executable, "-m", "kawhi.cli", "explain", str(src), "-o", str(tmp_path / "views")],
                         capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    explained = _explain_errors(run.stderr, len(groups))
    assert len(explained) == len(ROWS) and len(list((tmp_path / "views").glob("*.png"))) == 1, run.stderr[-2000:]
    # gRPC, one request with per-group errors over the rows a message can hold
    from kawhi_client.grpc import convert
    from kawhi_client.grpc._proto import kawhi_pb2 as pb

    messages = [_grpc_message(copy.deepcopy(g)) for g in groups]
    refused = {ROWS[i][0] for i, m in enumerate(messages[:len(ROWS)]) if m is None}
    assert refused == UNREPRESENTABLE, refused ^ UNREPRESENTABLE
    held = [i for i, m in enumerate(messages) if m is not None]
    answer = server.stub().Reweight(pb.ReweightRequest(groups=[messages[i] for i in held], per_group_errors=True),
                                    timeout=600)
    via_grpc = {i: convert.group_result_from_message(answer.results[k]) for k, i in enumerate(held)}

    assert len(local) == len(remote) == len(cli) == len(groups)
    mismatches = []
    for i, (name, _, slug, pointer) in enumerate(ROWS):
        got = {
            "in-process": (_slug(local[i]["error"]), local[i]["error"]["pointer"]),
            "http": (_slug(remote[i]["error"]), remote[i]["error"]["pointer"].removeprefix(f"/groups/{i}")),
            "cli": (_slug(cli[i]["error"]), cli[i]["error"]["pointer"]),
            "kawhi explain": explained[i + 1],
        }
        if i in via_grpc:
            error = via_grpc[i].error
            got["grpc"] = (_slug(error.model_dump()), error.pointer.removeprefix(f"/groups/{held.index(i)}"))
            assert error.detail == local[i]["error"]["detail"], (name, error.detail)
        for front, value in got.items():
            if value != (slug, pointer):
                mismatches.append((name, front, value, (slug, pointer)))
        # the details agree too, and say nothing internal
        details = {local[i]["error"]["detail"], remote[i]["error"]["detail"], cli[i]["error"]["detail"]}
        assert len(details) == 1, (name, details)
        assert not any(word in d for d in details for word in ("0x7f", "Error:", "Traceback", "<class")), details
    assert not mismatches, mismatches
    assert local[-1]["error"] is None and remote[-1].get("error") is None and "error" not in cli[-1]
    assert via_grpc[len(groups) - 1].error is None
    assert cli[-1]["kawhi"]["model"] == r.json()["model"] and cli[-1]["kawhi"]["options"] == r.json()["options"]


def test_bad_options_agree(server: GrpcServerThread) -> None:
    """Request-level: the same bad option is the same type and pointer in-process and over HTTP."""
    from kawhi.errors import KawhiError

    engine = default_engine(server.settings)
    cases = [({"w_min": -1.0, "w_max": -1.0}, "/options/w_min"), ({"temperature": 1e300}, "/options/temperature"),
             ({"seed": -1}, "/options/seed"), ({"seed": 2**64}, "/options/seed"),
             ({"normalize": "mean", "w_min": 0.0, "w_max": 0.0}, "/options/w_max"),
             ({"estimator": "nope"}, "/options/estimator"), ({"regions": "nope"}, "/options/regions"),
             ({"sguf": {"beta": -1}}, "/options/sguf/beta"), ({"eps": "0.1"}, "/options/eps"),
             ({"heads": [99]}, "/options/heads"), ({"sguf": {"colour": 1}}, "/options/sguf/colour")]
    with server.client() as client:
        for options, pointer in cases:
            with pytest.raises(KawhiError) as info:
                LocalService(engine).reweight([small_group(1)], options)
            r = client.post("/v1/reweight", json={"groups": [small_group(1)], "options": options})
            assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
            assert (r.json()["pointer"], _slug(r.json())) == (info.value.pointer, info.value.slug), options
            assert r.json()["pointer"] == pointer, (options, r.json())


def test_the_echoed_options_can_be_sent_back(server: GrpcServerThread) -> None:
    with server.client() as client:
        first = client.post("/v1/reweight", json={"groups": [small_group(2)], "options": {"sguf": {"beta": 0.2}}})
        assert first.status_code == 200, first.text
        echoed = first.json()["options"]
        assert echoed["sguf"]["beta"] == 0.2
        again = client.post("/v1/reweight", json={"groups": [small_group(2)], "options": echoed})
        assert again.status_code == 200, again.text
        assert again.json()["options"] == echoed and again.json()["results"] == first.json()["results"]


def test_a_registered_estimator_is_reachable_by_name_over_http(server: GrpcServerThread) -> None:
    """Estimators are chosen by registry name everywhere: one registered in Python is an HTTP option."""
    import numpy as np
    from kawhi.engine.estimators import ADVANTAGE_ESTIMATORS, register_advantage_estimator

    @register_advantage_estimator("test_rank")
    def rank(rewards, *, given=None, eps=1e-6, std="population"):  # planted: advantage = rank - mean rank
        order = np.argsort(np.argsort(rewards)).astype(float)
        return order - order.mean()

    try:
        group = small_group(9)
        for j, r in enumerate(group["responses"]):
            r["reward"] = [5.0, -2.0, 100.0][j]
        with server.client() as client:
            r = client.post("/v1/reweight", json={"groups": [group], "options": {"estimator": "test_rank"}})
        assert r.status_code == 200, r.text
        assert [x["advantage"] for x in r.json()["results"][0]["responses"]] == [0.0, -1.0, 1.0]
    finally:
        ADVANTAGE_ESTIMATORS.pop("test_rank", None)
