"""Transient faults over a real socket, from a scripted stub server.

Why a stub: the real `kawhi serve` (tested in test_client_server.py) cannot be made
to answer "503 then 200" on cue, to put a proxy's HTML 502 in between, to drop a
connection without an answer, to stall a response for a chosen time, or to hold
requests long enough to observe how many are in flight at once. This stub plays such
a script on a real TCP socket (``http.server``), so the client's real transport,
timeouts and retry loop run exactly as in production; everything it answers has the
shapes of the real server (problem+json, /readyz states, /v1/info limits).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kawhi_client import (
    AsyncClient,
    Client,
    InvalidRequest,
    KawhiConnectionError,
    KawhiTimeout,
    Overloaded,
    ServerNotReady,
)

PNG = (Path(__file__).resolve().parents[2] / "examples/images/triangle.png").read_bytes()

INFO = {"model": "stub", "version": "0", "limits": {"max_groups": 256, "max_body_bytes": 1 << 26,
                                                    "max_request_tokens": 1 << 20},
        "server": {"queue_groups": 512}}

DROP = "drop"  # close the connection without an answer

Reply = str | tuple  # DROP, or (status, headers, body[, delay_s])


def problem(status: int, slug: str, **extra: Any) -> bytes:
    return json.dumps({"type": f"https://kawhi.dev/problems/{slug}", "title": slug, "status": status,
                       "detail": "", "pointer": "", **extra}).encode()


def answer(body: bytes) -> bytes:
    groups = json.loads(body)["groups"]
    return json.dumps({"model": "stub", "version": "0", "options": {}, "usage": {"tokens": 1, "milliseconds": 1},
                       "results": [{"id": g.get("id"), "responses": [
                           {"advantage": 1.0, "paragraphs": [], "token_advantages": [1.0], "token_weights": [1.0]}
                           for _ in g["responses"]]} for g in groups]}).encode()


class Stub:
    """Plays ``script[path]`` (a list of replies, used up in order), then the default
    answer of that path. Records every request and the most /v1/reweight in flight."""

    def __init__(self, script: dict[str, list[Reply]] | None = None, delay: float = 0.0) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay = delay  # seconds every /v1/reweight takes
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.handle_any()

            def do_POST(self) -> None:
                self.handle_any()

            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self.path
                with stub.lock:
                    stub.log.append({"path": path, "rid": self.headers.get("x-request-id"), "t": time.monotonic(),
                                     "auth": self.headers.get("authorization"),
                                     "ctype": self.headers.get("content-type"), "body": body})
                    reply = stub.script[path].pop(0) if stub.script.get(path) else None
                if reply == DROP:
                    self.close_connection = True
                    return
                if reply is None:
                    reply = stub.default(path, body)
                status, headers, content, *rest = reply
                track = path == "/v1/reweight"
                if track:
                    with stub.lock:
                        stub.in_flight += 1
                        stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    time.sleep(rest[0] if rest else (stub.delay if track else 0.0))
                finally:
                    if track:
                        with stub.lock:
                            stub.in_flight -= 1
                self.send_response(status)
                for k, v in {"content-type": "application/problem+json" if status >= 400 else "application/json",
                             "content-length": str(len(content)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(content)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def default(self, path: str, body: bytes) -> tuple:
        if path == "/readyz":
            return 200, {}, json.dumps({"state": "ready", "reasons": []}).encode()
        if path == "/v1/info":
            return 200, {}, json.dumps(INFO).encode()
        if path == "/v1/images":
            return 200, {}, json.dumps({"sha256": hashlib.sha256(body).hexdigest()}).encode()
        if path == "/v1/reweight":
            return 200, {}, answer(body)
        return 404, {}, problem(404, "not-found")

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["path"] == path]

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def group(i: int, n_tokens: int = 0) -> dict[str, Any]:
    r: dict[str, Any] = {"text": f"answer {i}", "reward": float(i % 2)}
    if n_tokens:
        r["token_ids"] = list(range(n_tokens))
    return {"id": f"g{i}", "image": PNG, "prompt": f"q{i}", "responses": [r, dict(r, reward=1.0)]}


def client(stub: Stub, **kw: Any) -> Client:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("wait_ready", 5.0)
    return Client(stub.url, "k", **kw)


def test_503_then_200_is_retried_after_retry_after_with_the_same_request_id() -> None:
    with Stub({"/v1/reweight": [(503, {"Retry-After": "1"}, problem(503, "loading")),
                                (429, {"Retry-After": "0"}, problem(429, "queue-full")),
                                (502, {"content-type": "text/html"}, b"<html>Bad Gateway</html>")]}) as s:
        with client(s, retries=5) as c:
            t0 = time.monotonic()
            res = c.reweight([group(0)], request_id="step-1")
        calls = s.calls("/v1/reweight")
    assert [r.id for r in res] == ["g0"]
    assert [e["rid"] for e in calls] == ["step-1"] * 4
    assert calls[1]["t"] - calls[0]["t"] >= 1.0  # Retry-After: 1 honoured
    assert time.monotonic() - t0 < 5
    assert c.stats.retries == 3 and all(e["auth"] == "Bearer k" for e in s.log)
    # the image went once, as the raw file bytes with its media type; the request refers to its hash
    (upload,) = s.calls("/v1/images")
    assert upload["body"] == PNG and upload["ctype"] == "image/png"
    assert json.loads(calls[0]["body"])["groups"][0]["image"] == {"sha256": hashlib.sha256(PNG).hexdigest()}


def test_a_dropped_connection_is_retried_and_then_typed() -> None:
    with Stub({"/v1/reweight": [DROP]}) as s, client(s, retries=2) as c:
        assert c.reweight([group(0)])[0].id == "g0"
        assert len(s.calls("/v1/reweight")) == 2
    with Stub({"/v1/reweight": [DROP] * 3}) as s, client(s, retries=2) as c:
        with pytest.raises(KawhiConnectionError) as info:
            c.reweight([group(0)], request_id="r-2")
        assert info.value.attempts == 3 and info.value.request_id == "r-2"


def test_overload_that_outlasts_the_retries_is_raised_not_swallowed() -> None:
    with Stub({"/v1/reweight": [(429, {"Retry-After": "0"}, problem(429, "queue-full"))] * 3}) as s:
        with client(s, retries=2) as c, pytest.raises(Overloaded) as info:
            c.reweight([group(0)])
    assert info.value.attempts == 3 and info.value.retry_after == 0.0 and len(s.calls("/v1/reweight")) == 3


def test_a_4xx_is_never_retried() -> None:
    with Stub({"/v1/reweight": [(422, {}, problem(422, "validation", pointer="/groups/0/responses"))]}) as s:
        with client(s, retries=5) as c, pytest.raises(InvalidRequest):
            c.reweight([group(0)])
    assert len(s.calls("/v1/reweight")) == 1


def test_timeouts_grow_with_the_work_sent() -> None:
    """Every answer takes 0.6 s. A short request with a 0.2 s base timeout times out (and
    is retried, then raised); a long one (2 x 4096 trainer tokens) gets a read timeout
    scaled to its size and succeeds — the long rollout is not dropped by a fixed short timeout."""
    with Stub(delay=0.6) as s, client(s, timeout=0.2, timeout_per_token=0.0002, retries=1) as c:
        with pytest.raises(KawhiTimeout) as info:
            c.reweight([group(0)])
        assert info.value.attempts == 2
        assert c.reweight([group(1, n_tokens=4096)])[0].id == "g1"


def test_the_in_flight_cap_holds_across_retries() -> None:
    """12 single-group requests, 2 in flight at most; half are told 429 first. At no time
    does the server see more than 2 requests from this client."""
    script = {"/v1/reweight": [(429, {"Retry-After": "0"}, problem(429, "queue-full"), 0.05)] * 6}
    with Stub(script, delay=0.05) as s, client(s, max_in_flight=2, max_groups_per_request=1, retries=5) as c:
        res = c.reweight([group(i) for i in range(12)])
        assert [r.id for r in res] == [f"g{i}" for i in range(12)]
        assert len(s.calls("/v1/reweight")) == 18
        assert s.max_in_flight == 2

    async def run(stub: Stub) -> list[Any]:
        async with AsyncClient(stub.url, max_in_flight=3, max_groups_per_request=1, backoff=0.01,
                               wait_ready=5.0) as c:
            a, b = await asyncio.gather(c.reweight([group(i) for i in range(6)]),
                                        c.reweight([group(i) for i in range(6, 12)]))
            return a + b

    with Stub(script, delay=0.05) as s:
        res = asyncio.run(run(s))
        assert [r.id for r in res] == [f"g{i}" for i in range(12)]
        assert s.max_in_flight == 3  # the cap is per client, across concurrent calls


def test_the_first_call_waits_for_readyz() -> None:
    loading = (503, {"Retry-After": "0"}, problem(503, "loading", state="loading",
                                                  reasons=["the reference model is loading"]))
    with Stub({"/readyz": [loading, loading]}) as s, client(s) as c:
        c.reweight([group(0)])
        paths = [e["path"] for e in s.log]
    assert paths[:4] == ["/readyz", "/readyz", "/readyz", "/v1/info"]


def test_a_server_that_failed_to_load_is_reported_at_once() -> None:
    failed = (503, {}, problem(503, "unavailable", state="failed",
                               reasons=["model failed to load: OSError: no such model"]))
    with Stub({"/readyz": [failed]}) as s, client(s, wait_ready=60.0) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerNotReady, match="no such model") as info:
            c.reweight([group(0)])
        assert time.monotonic() - t0 < 2 and info.value.state == "failed"


def test_no_server_at_all_is_a_bounded_wait_with_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", wait_ready=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerNotReady, match="not ready after") as info:
            c.reweight([group(0)])
    assert 0.9 <= time.monotonic() - t0 < 3
    assert info.value.state == "unreachable" and "ConnectError" in str(info.value)


def test_a_wrong_port_fails_in_seconds_with_the_default_wait() -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}") as c:
        t0 = time.monotonic()
        with pytest.raises(ServerNotReady, match=f"nothing answers at http://127.0.0.1:{port}"):
            c.reweight([group(0)])
    assert time.monotonic() - t0 < 10
