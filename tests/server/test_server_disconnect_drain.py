"""Disconnects, slow clients and the drain deadline, against the server `kawhi serve` runs.

The forward is held at a gate (the only stand-in here: a slow forward cannot be
caused on demand otherwise); everything else is real: uvicorn with kawhi's protocol
and draining server, real sockets, the real batcher and metrics.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from server_fixtures import default_engine, metric, small_group


class GatedEngine:
    """The kawhi-tiny engine whose forward waits until ``gate`` opens; counts the groups it ran."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.groups_run = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, prepared: Any) -> Any:
        self.entered.set()
        self.gate.wait(60)
        self.groups_run += len(prepared)
        return self._engine.run(prepared)


class ProductServer:
    """create_app + kawhi.serve.make_server on a free port, in a thread."""

    def __init__(self, **overrides: Any) -> None:
        from kawhi.serve import make_server
        from kawhi.server.app import create_app
        from kawhi.settings import Settings

        overrides.setdefault("log_level", "warning")
        self.settings = Settings(port=0, **overrides)
        self.engine = GatedEngine(default_engine(self.settings))
        self.app = create_app(self.settings, engine=self.engine)
        self.state = self.app.state.kawhi
        self.server = make_server(self.settings, self.app)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ProductServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.engine.gate.set()
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def raw(self, data: bytes) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port))
        conn.sendall(data)
        return conn


def _request_bytes(body: dict, declared: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST /v1/reweight HTTP/1.1\r\nHost: kawhi\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared if declared is not None else len(data)}\r\n\r\n").encode()
    return head + data


def _until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _post_in_thread(url: str, body: dict, out: dict) -> threading.Thread:
    def go() -> None:
        t0 = time.monotonic()
        try:
            out["response"] = httpx.post(url + "/v1/reweight", json=body, timeout=60)
        except httpx.HTTPError as exc:
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0
    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_a_disconnected_client_has_its_queued_groups_dropped(caplog: pytest.LogCaptureFixture) -> None:
    with ProductServer(batch_wait_ms=0) as srv:
        first: dict = {}
        first_thread = _post_in_thread(srv.url, {"groups": [small_group(1)]}, first)
        assert srv.engine.entered.wait(20)  # the first request's group is in the forward
        gone = srv.raw(_request_bytes({"groups": [small_group(10 + i) for i in range(4)]}))
        _until(lambda: metric(srv.metrics(), "kawhi_queue_depth") == 4)  # prepared and queued behind it
        with caplog.at_level("INFO", logger="kawhi.server"):
            gone.close()
            _until(lambda: metric(srv.metrics(), "kawhi_queue_dropped_total", 'reason="client-closed"') == 4)
        assert metric(srv.metrics(), "kawhi_queue_depth") == 0
        srv.engine.gate.set()
        first_thread.join(30)
        assert first["response"].status_code == 200
        text = srv.metrics()
        assert srv.engine.groups_run == 1 and metric(text, "kawhi_groups_total") == 1  # none of the 4 ran
        assert metric(text, "kawhi_errors_total", 'type="client-closed"') == 1
        assert metric(text, "kawhi_requests_total", 'frontend="http",route="/v1/reweight",status="499"') == 1
        assert metric(text, "kawhi_requests_total", 'frontend="http",route="/v1/reweight",status="500"') == 0
        closed = [r for r in caplog.records if "client closed" in r.getMessage()]
        assert len(closed) == 1 and not any(r.exc_info for r in caplog.records)


def test_slow_headers_are_cut_and_a_stalled_body_is_a_408() -> None:
    with ProductServer(header_timeout_s=0.5, body_timeout_s=0.5) as srv:
        slow = srv.raw(b"POST /v1/reweight HTTP/1.1\r\nHost: kawhi\r\n")  # headers never finish
        slow.settimeout(5)
        t0 = time.monotonic()
        assert slow.recv(1024) == b""  # closed by the server
        assert 0.4 < time.monotonic() - t0 < 3
        slow.close()
        stalled = srv.raw(_request_bytes({"groups": [small_group(2)]}, declared=100000)[:400])
        stalled.settimeout(5)
        answer = ""
        while "request-timeout" not in answer:
            chunk = stalled.recv(65536).decode("latin-1")
            if not chunk:
                break
            answer += chunk
        stalled.close()
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert "application/problem+json" in answer and "request-timeout" in answer


def test_drain_is_bounded_by_the_drain_timeout_and_answers_503() -> None:
    drain = 2.0
    with ProductServer(drain_timeout_s=drain, batch_wait_ms=0) as srv:
        held: dict = {}
        held_thread = _post_in_thread(srv.url, {"groups": [small_group(3)]}, held)
        assert srv.engine.entered.wait(20)
        t0 = time.monotonic()
        srv.server.handle_exit(signal.SIGTERM, None)  # what the first SIGTERM does
        refused = httpx.post(srv.url + "/v1/reweight", json={"groups": [small_group(4)]}, timeout=10)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        held_thread.join(drain + 5)
        answered = time.monotonic() - t0
        response = held["response"]
        assert response.status_code == 503 and response.headers["content-type"].startswith("application/problem+json")
        assert int(response.headers["retry-after"]) >= 1 and response.json()["type"].endswith("/draining")
        assert answered < drain
        srv.thread.join(drain + 5)
        stopped = time.monotonic() - t0
        assert not srv.thread.is_alive()
        assert stopped < drain + 0.5, f"shutdown took {stopped:.2f} s for a drain timeout of {drain} s"


def _abandoned_body(path: str, content_type: str, first_bytes: bytes) -> bytes:
    """The head of a POST declaring 5000 body bytes and only the first few of them."""
    head = (f"POST {path} HTTP/1.1\r\nHost: kawhi\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 5000\r\n\r\n").encode()
    return head + first_bytes


ABANDONED = [
    ("/v1/reweight", "application/json", b'{"groups": [' + b" " * 100),
    ("/v1/explain", "application/json", b'{"groups": [' + b" " * 100),
    ("/v1/images", "image/png", b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
    ("/v1/images", "multipart/form-data; boundary=kb",
     b'--kb\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + b"\0" * 100),
]


def test_a_client_gone_while_sending_its_body_is_a_499_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26.1: the body never finishes, the socket closes: client-closed (499), not a 500."""
    with ProductServer() as srv, caplog.at_level("INFO"):
        for path, content_type, first in ABANDONED:
            conn = srv.raw(_abandoned_body(path, content_type, first))
            time.sleep(0.2)  # the route is reading the body
            conn.close()
        routes = ("/v1/reweight", "/v1/explain", "/v1/images")

        def answered(status: str) -> float:
            text = srv.metrics()
            return sum(metric(text, "kawhi_requests_total", f'frontend="http",route="{r}",status="{status}"')
                       for r in routes)

        _until(lambda: answered("499") == len(ABANDONED))
        text = srv.metrics()
        assert answered("500") == 0 and metric(text, "kawhi_errors_total", 'type="internal"') == 0
        assert metric(text, "kawhi_errors_total", 'type="client-closed"') == len(ABANDONED)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= 40], [r.getMessage() for r in caplog.records]
    access = [r for r in caplog.records if r.name == "kawhi.server.access" and getattr(r, "path", "") in routes]
    assert sorted(r.status for r in access) == [499] * len(ABANDONED)


def _explain_bytes(body: dict, query: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/explain{query} HTTP/1.1\r\nHost: kawhi\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def test_an_abandoned_explain_is_dropped_before_its_forward() -> None:
    """Issue 26.2: an explain whose client has gone is not computed (nor drawn): 499, its group dropped."""
    with ProductServer(batch_wait_ms=0) as srv:
        first: dict = {}
        first_thread = _post_in_thread(srv.url, {"groups": [small_group(1)]}, first)
        assert srv.engine.entered.wait(20)  # the forward is busy with the first request
        gone = [srv.raw(_explain_bytes({"groups": [small_group(20 + i)]})) for i in range(3)]
        _until(lambda: metric(srv.metrics(), "kawhi_queue_depth") == 3)
        for conn in gone:
            conn.close()
        _until(lambda: metric(srv.metrics(), "kawhi_queue_dropped_total", 'reason="client-closed"') == 3)
        srv.engine.gate.set()
        first_thread.join(30)
        assert first["response"].status_code == 200
        text = srv.metrics()
        assert srv.engine.groups_run == 1
        assert metric(text, "kawhi_requests_total", 'frontend="http",route="/v1/explain",status="499"') == 3
        assert metric(text, "kawhi_requests_total", 'frontend="http",route="/v1/explain",status="200"') == 0


def test_an_explain_page_no_group_can_fill_is_refused_before_the_forward() -> None:
    """Issue 26.2: ``page`` is checked before the computation (the forward stays gated: never run)."""
    with ProductServer(request_timeout_s=5) as srv:
        body = {"groups": [small_group(3)]}
        for query, accept in (("?page=100000", "image/png"), ("?page=2", "text/html")):
            r = httpx.post(srv.url + "/v1/explain" + query, json=body, headers={"accept": accept}, timeout=30)
            assert r.status_code == 422 and r.json()["type"].endswith("/validation"), (query, r.text[:300])
            assert "page" in r.json()["detail"]
        assert not srv.engine.entered.is_set() and srv.engine.groups_run == 0
