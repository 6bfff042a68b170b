"""The outermost ASGI layer: request id, body-size limit, metrics and the access log.

A pure ASGI middleware (no BaseHTTPMiddleware) so that the request id context
variable set here is visible to the handler, its threads and every log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kawhi.errors import KawhiError
from kawhi.server.logs import accept_request_id, request_id_var
from kawhi.server.problems import problem_response

log = logging.getLogger("kawhi.server.access")
# Probes and scrapes are logged at debug, not info: one line per kubelet probe forever is noise.
PROBE_PATHS = frozenset({"/healthz", "/health", "/readyz", "/metrics"})


class _BodyTooLarge(Exception):
    pass


def _route_label(app: Any, scope: dict) -> str:
    """The route template (low cardinality) that matched, or 'unmatched'."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    from starlette.routing import Match

    for r in getattr(app, "routes", ()):
        try:
            match, _ = r.matches(scope)
        except Exception:
            continue
        if match == Match.FULL:
            return getattr(r, "path", "unmatched")
    return "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: Callable, *, state: Any) -> None:
        self.app = app
        self.state = state  # ServerState: settings, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = accept_request_id(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        metrics = self.state.metrics
        limit = self.state.settings.max_body_bytes
        started = time.perf_counter()
        status_holder: dict[str, Any] = {"status": 500, "started": False}
        rid_header = (b"x-request-id", rid.encode())
        routing: str | None = None
        if scope.get("path") == "/v1/reweight" and scope.get("method") == "POST":
            routing = metrics.observe_routing_key(headers.get(b"x-kawhi-routing-key", b"").decode("latin-1"))

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message = dict(message)
                message["headers"] = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message["headers"].append(rid_header)
            await send(message)

        received = 0

        async def receive_wrapper() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        metrics.in_flight.inc()
        try:
            declared: int | None = None
            raw_len = headers.get(b"content-length")
            if raw_len is not None:
                try:
                    declared = int(raw_len)
                except ValueError:
                    declared = None
            if declared is not None and declared > limit:
                await self._too_large(send_wrapper, rid, declared)
                return
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except _BodyTooLarge:
                if not status_holder["started"]:
                    await self._too_large(send_wrapper, rid, None)
        finally:
            metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            status = str(status_holder["status"])
            route = _route_label(scope.get("app") or self.app, scope)
            metrics.requests.labels("http", route, status).inc()
            metrics.request_duration.labels("http", route, status).observe(elapsed)
            log.log(
                logging.DEBUG if scope.get("path") in PROBE_PATHS else logging.INFO,  # a kubelet probes every few s
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "route": route,
                    "status": status_holder["status"],
                    "ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                    **({"routing": routing} if routing else {}),
                },
            )
            request_id_var.reset(token)

    async def _too_large(self, send: Callable, rid: str, declared: int | None) -> None:
        limit = self.state.settings.max_body_bytes
        size = f"{declared} bytes" if declared is not None else "more"
        err = KawhiError("too-large", f"request body is {size}; the limit is {limit} bytes")
        self.state.count_error(err)
        response = problem_response(err, rid)
        await response({"type": "http"}, _empty_receive, send)


async def _empty_receive() -> dict:
    return {"type": "http.disconnect"}
