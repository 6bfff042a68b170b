"""The client's pure parts, without a network: the retry policy (on a fake clock),
Retry-After parsing, splitting, pointer rewriting, error mapping, image inputs and
request building. The jobs of ``kawhi_client.core`` are generators that yield what
they need done; ``FakeDriver`` answers them from a script and advances a fake clock
on every sleep, so the whole retry/wait logic runs here in microseconds.

What needs a socket is in test_client_server.py (the real `kawhi serve`) and
test_client_faults.py (scripted faults the real server cannot be made to produce).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from kawhi_client import (
    Client,
    GatewayTimeout,
    ImageNotFound,
    InvalidRequest,
    KawhiConnectionError,
    KawhiTimeout,
    Limits,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RetryPolicy,
    ServerError,
    ServerNotReady,
    Timeouts,
    Unauthorized,
    Unavailable,
    parse_retry_after,
)
from kawhi_client.core import Call, Core, Parallel, Sleep, resume
from kawhi_client.errors import error_from_response
from kawhi_client.planning import (
    build_body,
    estimate_tokens,
    options_json,
    plan_chunks,
    prepare_groups,
    remap_pointer,
)
from kawhi_client.schema import ImageRef, RolloutGroup

ROOT = Path(__file__).resolve().parents[2]
PNG = (ROOT / "examples/images/bar_chart.png").read_bytes()
PNG_SHA = hashlib.sha256(PNG).hexdigest()


# ====================================================================== fakes


class MaxRng:
    """rng.uniform(a, b) -> b: the longest wait full jitter allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


class MinRng:
    def uniform(self, a: float, b: float) -> float:
        return a


def make_core(retries: Any = 3, **kw: Any) -> Core:
    """The core of a real Client (its constructor resolves the arguments), with a fixed rng."""
    args: dict[str, Any] = dict(
        base_url="http://kawhi.test", api_key=None, timeout=10.0, timeout_per_token=0.01, connect_timeout=1.0,
        max_in_flight=2, retries=retries, backoff=0.5, wait_ready=False, max_groups_per_request=None, headers=None,
    )
    args.update(kw)
    client = Client(**args)
    client.close()  # the jobs run on the FakeDriver, never on this transport
    return Core(client.config, rng=MaxRng())


def response(status: int, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    if isinstance(body, (dict, list)):
        content = json.dumps(body).encode()
        ctype = "application/problem+json" if status >= 400 else "application/json"
    else:
        content = body if isinstance(body, bytes) else b""
        ctype = "text/html"
    return httpx.Response(status, headers={"content-type": ctype, **(headers or {})}, content=content,
                          request=httpx.Request("GET", "http://kawhi.test/"))


def problem(status: int, slug: str = "x", pointer: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": f"https://kawhi.dev/problems/{slug}", "title": slug, "status": status, "detail": "d",
            "pointer": pointer, **extra}


class FakeDriver:
    """Answers a job's Call actions from a script (responses, or exceptions to raise);
    Sleep advances the fake clock; Parallel runs the jobs one by one."""

    def __init__(self, core: Core, script: list[Any]) -> None:
        self.now = 0.0
        core.clock = lambda: self.now
        core.wallclock = lambda: 1_700_000_000.0 + self.now
        self.script = list(script)
        self.calls: list[Call] = []
        self.sleeps: list[float] = []

    def run(self, job: Any) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            done, action = resume(job, value, error)
            if done:
                return action
            value, error = None, None
            if isinstance(action, Call):
                self.calls.append(action)
                reply = self.script.pop(0)
                reply = reply(action) if callable(reply) else reply
                if isinstance(reply, BaseException):
                    error = reply
                else:
                    value = reply
            elif isinstance(action, Sleep):
                self.sleeps.append(action.seconds)
                self.now += action.seconds
            else:
                assert isinstance(action, Parallel)
                value = [self.run(j) for j in action.jobs]


def exchange(core: Core, **kw: Any) -> Any:
    return core.exchange("POST", "/v1/reweight", timeout=core.timeouts.for_tokens(0), content=b"{}", **kw)


# ====================================================================== retry policy


def test_backoff_is_exponential_full_jitter_capped() -> None:
    p = RetryPolicy(max_attempts=10, backoff=0.5, max_backoff=4.0)
    assert [p.delay(n, rng=MaxRng()) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [p.delay(n, rng=MinRng()) for n in range(1, 4)] == [0.0, 0.0, 0.0]  # full jitter: from zero
    assert p.delay(10, rng=MaxRng()) is None  # attempts exhausted


def test_retry_after_is_honoured_and_bounded() -> None:
    p = RetryPolicy(max_attempts=5, backoff=0.5, max_retry_after=60.0, give_up_after=100.0)
    assert p.delay(1, retry_after=7.0, rng=MinRng()) == 7.0
    assert p.delay(3, retry_after=7.0, rng=MaxRng()) == 7.5  # + at most `backoff` of jitter
    assert p.delay(1, retry_after=61.0) is None  # longer than we are willing to wait: give up now
    assert p.delay(1, retry_after=7.0, elapsed=95.0, rng=MinRng()) is None  # the retry budget (time)


@pytest.mark.parametrize(
    "value, expected",
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), ("-4", 0.0), ("", None), (None, None), ("soon", None),
     ("inf", None), ("nan", None)],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=0.0) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 12, usegmt=True), now=now) == pytest.approx(12.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0


def test_transient_statuses_are_retried_with_the_same_request_id() -> None:
    core = make_core(retries=5)
    d = FakeDriver(core, [response(503, problem(503, "loading"), {"Retry-After": "2"}),
                          response(429, problem(429, "queue-full"),
                                   {"Retry-After": email.utils.formatdate(1_700_000_000 + 10, usegmt=True)}),
                          response(502, b"<html>bad gateway</html>"),
                          response(200, {"ok": True})])
    resp = d.run(exchange(core))
    assert resp.status_code == 200
    assert len(d.calls) == 4
    assert len({c.headers["X-Request-ID"] for c in d.calls}) == 1  # one id across the retries
    # 503: Retry-After 2 (+0.5 jitter at most); 429: an HTTP date 7.5 s after that (+0.5); 502: full
    # jitter of the 3rd attempt
    assert d.sleeps[0] == pytest.approx(2.5)
    assert d.sleeps[1] == pytest.approx(8.0)
    assert d.sleeps[2] == pytest.approx(2.0)
    assert core.stats.retries == 3 and core.stats.http_requests == 4


@pytest.mark.parametrize("status, cls", [(400, InvalidRequest), (401, Unauthorized), (404, NotFound),
                                         (413, PayloadTooLarge), (415, InvalidRequest), (422, InvalidRequest),
                                         (500, ServerError)])
def test_other_errors_are_never_retried(status: int, cls: type) -> None:
    core = make_core(retries=5)
    d = FakeDriver(core, [response(status, problem(status, "p", "/groups/0")), response(200, {})])
    with pytest.raises(cls) as info:
        d.run(exchange(core, request_id="rid-1"))
    assert len(d.calls) == 1 and d.sleeps == []
    assert info.value.status == status and info.value.request_id == "rid-1" and info.value.attempts == 1
    assert info.value.pointer == "/groups/0"


def test_giving_up_raises_the_last_answer_typed() -> None:
    core = make_core(retries=2)
    d = FakeDriver(core, [response(429, problem(429, "queue-full"), {"Retry-After": "1"})] * 3)
    with pytest.raises(Overloaded) as info:
        d.run(exchange(core))
    assert info.value.attempts == 3 and info.value.retry_after == 1.0 and len(d.calls) == 3

    core = make_core(retries=1)
    d = FakeDriver(core, [response(503, problem(503, "draining"))] * 2)
    with pytest.raises(Unavailable):
        d.run(exchange(core))

    core = make_core(retries=1)
    d = FakeDriver(core, [response(504, problem(504, "timeout"))] * 2)
    with pytest.raises(KawhiTimeout) as t:  # a 504 is also a timeout
        d.run(exchange(core))
    assert isinstance(t.value, GatewayTimeout)


def test_connection_errors_and_timeouts_are_retried_then_typed() -> None:
    core = make_core(retries=3)
    d = FakeDriver(core, [httpx.ConnectError("refused"), httpx.RemoteProtocolError("dropped"),
                          httpx.ReadTimeout("slow"), response(200, {})])
    assert d.run(exchange(core)).status_code == 200
    assert d.sleeps == [0.5, 1.0, 2.0]  # backoff 0.5 * 2^(n-1), at the jitter's top (MaxRng)

    core = make_core(retries=2)
    d = FakeDriver(core, [httpx.ReadTimeout("slow")] * 3)
    with pytest.raises(KawhiTimeout) as info:
        d.run(exchange(core, request_id="abc"))
    assert info.value.attempts == 3 and info.value.request_id == "abc" and "abc" in str(info.value)

    core = make_core(retries=2)
    d = FakeDriver(core, [httpx.ConnectError("refused")] * 3)
    with pytest.raises(KawhiConnectionError):
        d.run(exchange(core))

    core = make_core(retries=0)  # no retries at all
    d = FakeDriver(core, [httpx.ConnectError("refused")])
    with pytest.raises(KawhiConnectionError):
        d.run(exchange(core))
    assert len(d.calls) == 1


# ====================================================================== waiting for /readyz


def test_wait_ready_waits_out_refusals_and_loading() -> None:
    core = make_core(wait_ready=30.0)
    assert not core.ready
    d = FakeDriver(core, [httpx.ConnectError("refused"), httpx.ConnectError("refused"),
                          response(503, problem(503, "loading", state="loading", reasons=["loading"]),
                                   {"Retry-After": "2"}),
                          response(200, {"state": "ready", "reasons": []})])
    assert d.run(core.wait_ready_job())["state"] == "ready"
    assert core.ready
    assert d.sleeps == [0.25, 0.5, 2.0]
    assert all(c.path == "/readyz" for c in d.calls)


def test_the_default_wait_gives_up_in_seconds_on_a_url_where_nothing_answers() -> None:
    core = make_core(wait_ready=True)
    d = FakeDriver(core, [httpx.ConnectError("[Errno 111] Connection refused")] * 50)
    with pytest.raises(ServerNotReady) as info:
        d.run(core.wait_ready_job())
    assert 5.0 <= d.now < 10.0, d.sleeps  # not the 600 s kept for a server that answers "loading"
    message = str(info.value)
    assert message.startswith("nothing answers at http://kawhi.test") and "Connection refused" in message
    assert "wait_ready=<seconds>" in message and info.value.state == "unreachable"


def test_the_default_wait_waits_out_loading_after_refusals_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    core = make_core(wait_ready=True)
    loading = response(503, problem(503, "loading", state="loading", reasons=["loading weights"]), {"Retry-After": "5"})
    d = FakeDriver(core, [httpx.ConnectError("refused")] * 3 + [loading] * 24 + [response(200, {"state": "ready"})])
    with caplog.at_level("WARNING", logger="kawhi_client"):
        assert d.run(core.wait_ready_job())["state"] == "ready"
    assert d.now > 100  # answered once: the long wait applies
    waits = [r.getMessage() for r in caplog.records if "waiting for http://kawhi.test/readyz" in r.getMessage()]
    assert 3 <= len(waits) <= 6 and "loading (loading weights)" in waits[-1], waits  # first at 5 s, then every 30 s


def test_an_explicit_wait_waits_out_refusals_the_whole_time() -> None:
    for core, job in ((make_core(wait_ready=60.0), None), (make_core(wait_ready=True), 60.0)):
        d = FakeDriver(core, [httpx.ConnectError("refused")] * 15 + [response(200, {"state": "ready"})])
        assert d.run(core.wait_ready_job(job))["state"] == "ready" and d.now > 20


def test_wait_ready_is_bounded_and_says_why() -> None:
    core = make_core(wait_ready=3.0)
    d = FakeDriver(core, [response(503, problem(503, "loading", state="loading",
                                                reasons=["the reference model is loading"]),
                                   {"Retry-After": "2"})] * 10)
    with pytest.raises(ServerNotReady) as info:
        d.run(core.wait_ready_job())
    assert info.value.state == "loading" and "the reference model is loading" in str(info.value)
    assert d.now == pytest.approx(3.0)  # the last wait is cut to the time left


def test_wait_ready_stops_at_once_when_the_model_failed() -> None:
    core = make_core(wait_ready=600.0)
    d = FakeDriver(core, [response(503, problem(503, "unavailable", state="failed",
                                                reasons=["model failed to load: OSError: nope"]))])
    with pytest.raises(ServerNotReady) as info:
        d.run(core.wait_ready_job())
    assert info.value.state == "failed" and "nope" in str(info.value) and d.sleeps == []


# ====================================================================== splitting


def test_plan_chunks_respects_every_limit_and_keeps_order() -> None:
    sizes = [(100, 10)] * 7
    assert plan_chunks(sizes, max_groups=3, max_bytes=10**6, max_tokens=10**6) == [[0, 1, 2], [3, 4, 5], [6]]
    # bytes: 20 overhead + (100 + 1 comma) per group -> 2 groups fit in 250
    assert plan_chunks(sizes[:5], max_groups=99, max_bytes=250, max_tokens=10**6, overhead=20) == [
        [0, 1], [2, 3], [4]]
    assert plan_chunks([(1, 5), (1, 5), (1, 1), (1, 9)], max_groups=99, max_bytes=10**6, max_tokens=10) == [
        [0, 1], [2, 3]]
    # an item too large on its own still goes (alone): the server names the limit
    assert plan_chunks([(1, 1), (1, 50), (1, 1)], max_groups=99, max_bytes=10**6, max_tokens=10) == [
        [0], [1], [2]]
    assert plan_chunks([], max_groups=1, max_bytes=1, max_tokens=1) == []


def test_limits_from_the_servers_info() -> None:
    info = {"limits": {"max_responses": 64, "max_response_tokens": 8192, "max_group_tokens": 32768,
                       "max_body_bytes": 67108864, "max_groups": 256, "max_request_tokens": 1048576},
            "server": {"queue_groups": 512}}
    lim = Limits.from_info(info)
    assert (lim.max_groups, lim.max_body_bytes, lim.max_request_tokens, lim.queue_groups) == (
        256, 67108864, 1048576, 512)
    assert lim.groups_per_request(max_in_flight=4) == 128  # 4 full requests never overflow the queue
    assert lim.groups_per_request(max_in_flight=1) == 256
    assert lim.groups_per_request(max_in_flight=4, cap=10) == 10
    # only the names /v1/info sends are read; missing values fall back to defaults
    assert Limits.from_info({"limits": {"max_groups_per_request": 8}}).max_groups == Limits().max_groups
    assert Limits.from_info({}).max_groups == Limits().max_groups


def test_pointers_are_rewritten_to_the_callers_indices() -> None:
    idx = [5, 9, 12]
    assert remap_pointer("/groups/1/responses/0/reward", idx) == "/groups/9/responses/0/reward"
    assert remap_pointer("/groups/2", idx) == "/groups/12"
    assert remap_pointer("/groups", idx) == "/groups"
    assert remap_pointer("", idx) == ""
    assert remap_pointer("/options/temperature", idx) == "/options/temperature"
    assert remap_pointer("/groups/10/image", idx) == "/groups/10/image"  # out of range: left alone


def test_timeouts_grow_with_the_work_sent() -> None:
    t = Timeouts(base=30.0, per_token=0.002)
    short = {"prompt": "hi", "responses": [{"text": "ok", "reward": 1.0}]}
    long = {"prompt": "hi", "responses": [{"text": "x", "reward": 1.0, "token_ids": list(range(8192))}] * 64}
    assert estimate_tokens(long) >= 64 * 8192
    assert t.read_timeout(estimate_tokens(long)) > 30.0 + 0.002 * 64 * 8192 - 1e-9
    assert t.read_timeout(estimate_tokens(short)) < 40.0
    assert t.for_tokens(estimate_tokens(long)).read > t.for_tokens(estimate_tokens(short)).read


# ====================================================================== errors


def test_problem_json_becomes_a_typed_error_with_pointer_and_request_id() -> None:
    body = json.dumps(problem(404, "image-not-found", "/groups/0/image/sha256", sha256="ab" * 32)).encode()
    err = error_from_response(404, body, headers={"x-request-id": "srv-1"}, request_id="cli-1")
    assert isinstance(err, ImageNotFound) and err.sha256 == "ab" * 32
    assert err.request_id == "srv-1" and err.pointer == "/groups/0/image/sha256" and err.status == 404
    assert "srv-1" in str(err) and "/groups/0/image/sha256" in str(err)
    again = pickle.loads(pickle.dumps(err))  # errors cross process boundaries (Ray, multiprocessing)
    assert type(again) is ImageNotFound and again.problem == err.problem and again.request_id == "srv-1"


def test_a_non_problem_error_body_still_becomes_a_typed_error() -> None:
    err = error_from_response(502, b"<html>Bad Gateway</html>", reason="Bad Gateway", request_id="r")
    assert isinstance(err, ServerError) and err.status == 502 and err.title == "Bad Gateway"
    assert "Bad Gateway" in err.detail and err.request_id == "r"


# ====================================================================== groups, images, options


def group(image: Any, **kw: Any) -> dict[str, Any]:
    return {"id": "g", "image": image, "prompt": "p", "responses": [{"text": "a", "reward": 1.0}], **kw}


def test_every_image_form_sends_the_same_bytes_by_hash(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(PNG)
    forms = [PNG, bytearray(PNG), memoryview(PNG), str(path), path, {"path": str(path)},
             {"data": base64.b64encode(PNG).decode()}, ImageRef(data=base64.b64encode(PNG).decode()),
             {"sha256": PNG_SHA.upper()}]
    prepared, failed, images = prepare_groups([group(f) for f in forms], per_group_errors=False)
    assert not failed
    for g in prepared:
        assert g is not None and g.sha256 == PNG_SHA
        assert json.loads(g.json)["image"] == {"sha256": PNG_SHA}  # the body carries the hash only
    assert images[PNG_SHA].data == PNG  # the exact file bytes, never re-encoded
    assert images[PNG_SHA].content_type == "image/png"


def test_rollout_group_models_and_dicts_give_the_same_wire_json() -> None:
    d = group(PNG, responses=[{"text": "a", "reward": 1.0, "token_ids": [1, 2]}, {"text": "b", "reward": 0.0}])
    m = RolloutGroup.model_validate({**d, "image": {"data": base64.b64encode(PNG).decode()}})
    (a, b), _, _ = prepare_groups([d, m], per_group_errors=False)
    assert a.json == b.json and a.tokens == b.tokens


def test_nan_rewards_are_sent_as_nan_not_null() -> None:
    (g,), _, _ = prepare_groups([group(PNG, responses=[{"text": "a", "reward": float("nan")}])], False)
    assert b'"reward":NaN' in g.json
    assert math.isnan(json.loads(g.json)["responses"][0]["reward"])


def test_bad_groups_are_refused_before_sending_with_pointers(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        prepare_groups([group(PNG), group(PNG, responses=[])], per_group_errors=False)
    assert info.value.pointer == "/groups/1/responses" and info.value.request_id is None
    with pytest.raises(InvalidRequest) as info:
        prepare_groups([group(str(tmp_path / "missing.png"))], per_group_errors=False)
    assert info.value.pointer == "/groups/0/image" and "missing.png" in info.value.detail
    with pytest.raises(InvalidRequest) as info:
        prepare_groups([group({"data": "not base64!"})], per_group_errors=False)
    assert info.value.pointer == "/groups/0/image/data"

    class DecodedImage:  # e.g. a PIL image: re-encoding it would change the bytes
        pass

    with pytest.raises(InvalidRequest, match="never re-encodes"):
        prepare_groups([group(DecodedImage())], per_group_errors=False)


def test_per_group_errors_keep_the_good_groups() -> None:
    prepared, failed, _ = prepare_groups(
        [group(PNG), group(PNG, id="bad", responses=[]), group(b"")], per_group_errors=True)
    assert prepared[0] is not None and prepared[1] is None and prepared[2] is None
    assert failed[1].id == "bad" and failed[1].error.pointer == "/groups/1/responses"
    assert failed[2].error.pointer == "/groups/2/image" and failed[2].error.status == 422


def test_options_merge_and_validate_locally() -> None:
    assert options_json() is None and options_json({}, {"seed": None}) is None
    assert json.loads(options_json({"temperature": 0.2}, {"seed": 3})) == {"temperature": 0.2, "seed": 3}
    with pytest.raises(InvalidRequest) as info:
        options_json(None, {"temprature": 0.2})
    assert info.value.pointer == "/options/temprature"
    with pytest.raises(InvalidRequest) as info:
        options_json(None, {"temperature": -1})
    assert info.value.pointer == "/options/temperature"


def test_request_body_is_valid_json_in_the_wire_shape() -> None:
    body = json.loads(build_body([b'{"a":1}', b'{"b":2}'], b'{"seed":1}', True))
    assert body == {"groups": [{"a": 1}, {"b": 2}], "options": {"seed": 1}, "per_group_errors": True}
    assert json.loads(build_body([b"{}"], None, False)) == {"groups": [{}]}


# ====================================================================== reweight job, end to end on a script


INFO = {"model": "m", "version": "v", "limits": {"max_groups": 2, "max_body_bytes": 10**6,
                                                   "max_request_tokens": 10**6}, "server": {"queue_groups": 100}}


def answer(call: Call, drop: set[int] | None = None) -> httpx.Response:
    """A well-formed reweight answer echoing the ids of the groups sent."""
    groups = json.loads(call.content)["groups"]
    results = [{"id": g.get("id"), "responses": [{"advantage": 1.0, "paragraphs": [],
                                                  "token_advantages": [float(i)], "token_weights": [1.0]}]}
               for i, g in enumerate(groups)]
    return response(200, {"model": "m", "version": "v", "options": {}, "usage": {"tokens": 10, "milliseconds": 1},
                          "results": results})


def test_a_split_batch_comes_back_in_input_order_with_rewritten_pointers() -> None:
    core = make_core(max_in_flight=1)
    groups = [group(PNG, id=f"g{i}") for i in range(5)]
    d = FakeDriver(core, [response(200, INFO), response(200, {"sha256": PNG_SHA}), answer, answer, answer])
    out = d.run(core.reweight_job(groups, None, {}, False, "step-7"))
    assert [r.id for r in out.results] == [f"g{i}" for i in range(5)]
    assert [c.headers["X-Request-ID"] for c in d.calls[2:]] == ["step-7.0", "step-7.1", "step-7.2"]
    assert [c.path for c in d.calls[:2]] == ["/v1/info", "/v1/images"]
    assert out.usage.tokens == 30
    # the image is known now: a second batch sends no upload
    d = FakeDriver(core, [answer, answer, answer])
    d.run(core.reweight_job(groups, None, {}, False, None))
    assert all(c.path == "/v1/reweight" for c in d.calls)


def test_an_error_in_a_later_request_points_into_the_callers_list() -> None:
    core = make_core(max_in_flight=1)
    groups = [group(PNG, id=f"g{i}") for i in range(4)]
    d = FakeDriver(core, [response(200, INFO), response(200, {"sha256": PNG_SHA}), answer,
                          response(422, problem(422, "validation", "/groups/1/responses/0/reward",
                                                errors=[{"pointer": "/groups/1/responses/0/reward", "detail": "x"}]))])
    with pytest.raises(InvalidRequest) as info:
        d.run(core.reweight_job(groups, None, {}, False, None))
    assert info.value.pointer == "/groups/3/responses/0/reward"
    assert info.value.problem.errors[0]["pointer"] == "/groups/3/responses/0/reward"


def test_an_evicted_image_is_uploaded_again_once() -> None:
    core = make_core()
    core.info, core.limits = INFO, Limits.from_info(INFO)
    core.remember(PNG_SHA)  # sent earlier ... and since evicted by the server
    not_found = response(404, problem(404, "image-not-found", "/groups/0/image/sha256", sha256=PNG_SHA))
    d = FakeDriver(core, [not_found, response(200, {"sha256": PNG_SHA}), answer])
    out = d.run(core.reweight_job([group(PNG)], None, {}, False, None))
    assert len(out.results) == 1
    assert [c.path for c in d.calls] == ["/v1/reweight", "/v1/images", "/v1/reweight"]
    assert d.calls[1].content == PNG and core.stats.image_reuploads == 1
    # evicted again right after the second upload: no loop, the error surfaces
    d = FakeDriver(core, [not_found, response(200, {"sha256": PNG_SHA}), not_found])
    with pytest.raises(ImageNotFound):
        d.run(core.reweight_job([group(PNG)], None, {}, False, None))
    # a hash the caller gave without bytes cannot be uploaded: the error surfaces at once
    d = FakeDriver(core, [not_found])
    with pytest.raises(ImageNotFound):
        d.run(core.reweight_job([group({"sha256": PNG_SHA})], None, {}, False, None))


def test_an_evicted_image_with_per_group_errors_redoes_only_those_groups() -> None:
    core = make_core()
    core.info, core.limits = INFO, Limits.from_info(INFO)
    core.remember(PNG_SHA)
    other = b"\x89PNG\r\n\x1a\n" + b"other"
    core.remember(hashlib.sha256(other).hexdigest())

    def first(call: Call) -> httpx.Response:
        body = json.loads(answer(call).content)
        body["results"][1] = {"id": "b", "error": problem(404, "image-not-found", "/groups/1/image/sha256",
                                                          sha256=PNG_SHA)}
        return response(200, body)

    d = FakeDriver(core, [first, response(200, {"sha256": PNG_SHA}), answer])
    out = d.run(core.reweight_job([group(other, id="a"), group(PNG, id="b")], None, {}, True, None))
    assert [r.error for r in out.results] == [None, None] and [r.id for r in out.results] == ["a", "b"]
    assert [len(json.loads(c.content)["groups"]) for c in d.calls if c.path == "/v1/reweight"] == [2, 1]


def test_a_request_too_large_for_the_server_is_split_in_two() -> None:
    core = make_core()
    core.info, core.limits = INFO, Limits.from_info({**INFO, "limits": {"max_groups": 64}})
    core.remember(PNG_SHA)
    too_large = response(413, problem(413, "too-large", "/groups"))
    d = FakeDriver(core, [too_large, answer, too_large, answer, answer])
    out = d.run(core.reweight_job([group(PNG, id=f"g{i}") for i in range(4)], None, {}, False, "r"))
    assert [r.id for r in out.results] == ["g0", "g1", "g2", "g3"]
    sent = [(c.headers["X-Request-ID"], len(json.loads(c.content)["groups"])) for c in d.calls]
    assert sent == [("r", 4), ("r.a", 2), ("r.b", 2), ("r.b.a", 1), ("r.b.b", 1)]
    # a 413 that names one group is that group's fault: no split
    d = FakeDriver(core, [response(413, problem(413, "too-large", "/groups/1/responses"))])
    with pytest.raises(PayloadTooLarge) as info:
        d.run(core.reweight_job([group(PNG), group(PNG)], None, {}, False, None))
    assert info.value.pointer == "/groups/1/responses"


def test_an_answer_that_breaks_the_contract_is_an_error() -> None:
    from kawhi_client import ProtocolError

    core = make_core()
    core.info, core.limits = INFO, Limits.from_info(INFO)
    core.remember(PNG_SHA)

    def short(call: Call) -> httpx.Response:
        body = json.loads(answer(call).content)
        body["results"] = body["results"][:1]
        return response(200, body)

    d = FakeDriver(core, [short])
    with pytest.raises(ProtocolError, match="1 results for 2 groups"):
        d.run(core.reweight_job([group(PNG), group(PNG)], None, {}, False, None))


def test_an_empty_batch_is_an_empty_answer() -> None:
    core = make_core()
    d = FakeDriver(core, [response(200, INFO)])
    out = d.run(core.reweight_job([], None, {}, False, None))
    assert out.results == [] and out.model == "m" and [c.path for c in d.calls] == ["/v1/info"]


def test_a_base_url_without_scheme_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="http://"):
        make_core(base_url="kawhi:8000")


# ====================================================================== packaging


def test_kawhi_client_imports_without_torch() -> None:
    code = ("import sys, kawhi_client; from kawhi_client import Client, AsyncClient, pad_token_advantages; "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "assert 'numpy' not in sys.modules, 'numpy is imported lazily'; "
            "assert 'PIL' not in sys.modules, 'the client never decodes images'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT / "client")


def test_the_json_schema_says_exactly_one_image_source_and_one_of_prompt_or_messages() -> None:
    """What the models' validators enforce, the published JSON Schema (and so /openapi.json) says."""
    jsonschema = pytest.importorskip("jsonschema")
    image = jsonschema.Draft202012Validator(ImageRef.model_json_schema())
    cases = [{"data": "aGk="}, {"sha256": "0" * 64}, {"path": "a.png"}, {"data": "aGk=", "sha256": None},
             {}, {"data": "aGk=", "sha256": "0" * 64}, {"sha256": "0" * 64, "path": "a.png"}, {"data": None}]
    for case in cases:
        accepted = True
        try:
            ImageRef.model_validate(case)
        except ValueError:
            accepted = False
        assert image.is_valid(case) == accepted, case
    group = jsonschema.Draft202012Validator({"oneOf": RolloutGroup.model_json_schema()["oneOf"]})
    assert group.is_valid({"prompt": "q"}) and group.is_valid({"messages": [], "prompt": None})
    assert not group.is_valid({"prompt": "q", "messages": []}) and not group.is_valid({})
