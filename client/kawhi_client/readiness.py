"""The readiness and info jobs of ``Core`` (a mixin): wait until the service says ready
(``GET /readyz`` over HTTP; the gRPC driver answers the same call from grpc.health.v1),
then read ``/v1/info`` once for the limits. See ``kawhi_client.core`` for the job style."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from kawhi_client.actions import RETRY_EXCEPTIONS, Call, Job, Sleep
from kawhi_client.config import (
    DEFAULT_READY_TIMEOUT_S,
    READY_LOG_EVERY_S,
    READY_LOG_FIRST_S,
    ClientConfig,
    Limits,
    Timeouts,
    parse_retry_after,
)
from kawhi_client.errors import ProtocolError, ServerNotReady
from kawhi_client.planning import json_or_none, new_request_id
from kawhi_client.replicas import ReplicaSet

log = logging.getLogger("kawhi_client")

class ReadinessJobs:
    """Mixed into ``Core``, which provides these attributes and ``exchange``/``refresh_replicas``."""

    config: ClientConfig
    base_url: str
    ready_timeout: float | None
    ready: bool
    replicas: ReplicaSet | None
    timeouts: Timeouts
    info: dict[str, Any] | None
    limits: Limits | None
    clock: Callable[[], float]
    wallclock: Callable[[], float]
    exchange: Callable[..., Job]
    refresh_replicas: Callable[[], Job]

    def wait_ready_job(self, timeout: float | None = None) -> Job:
        """Poll ``GET /readyz`` until it says ready (200), for at most ``timeout`` seconds.

        503 (loading) is waited out, honouring Retry-After, with a warning logged every
        ``READY_LOG_EVERY_S``; ``failed`` (the model did not load) or any other status ends
        the wait at once. Connection errors are waited out too, except that with the default
        ``wait_ready=True`` (and no explicit ``timeout``) one URL where nothing has answered
        yet is given up on after ``config.unreachable_grace`` seconds: a wrong URL or port.
        With several replicas they are probed in turn until one is ready; the wait ends
        early only when every replica has answered such a final state.
        """
        limit = self.ready_timeout if timeout is None else timeout
        limit = DEFAULT_READY_TIMEOUT_S if limit is None else float(limit)
        grace = self.config.unreachable_grace if timeout is None and self.replicas is None else None
        start = self.clock()
        interval = 0.25
        state: str | None = None
        reasons: list[str] = []
        probes = 0
        answered = False  # has anything at this URL answered HTTP yet?
        next_log = READY_LOG_FIRST_S
        final: dict[str, str] = {}  # replica -> the final state it answered
        while True:
            retry_after: float | None = None
            remaining = limit - (self.clock() - start)
            probe_timeout = httpx.Timeout(max(0.5, min(10.0, remaining)), connect=max(0.5, min(5.0, remaining)))
            endpoint: str | None = None
            if self.replicas is not None:
                yield from self.refresh_replicas()
                urls = self.replicas.urls
                endpoint = urls[probes % len(urls)] if urls else None
                probes += 1
            try:
                if self.replicas is not None and endpoint is None:
                    raise httpx.ConnectError(f"no replica of {self.replicas.description} is known yet")
                resp = yield Call("GET", "/readyz", {"X-Request-ID": new_request_id()}, probe_timeout,
                                  endpoint=endpoint)
            except RETRY_EXCEPTIONS as exc:  # not up yet: wait it out
                state, reasons = "unreachable", [f"{type(exc).__name__}: {exc}"]
            except httpx.HTTPError as exc:  # a bad URL, an unsupported scheme ...: waiting cannot help
                raise ServerNotReady(f"{self.base_url}/readyz: {type(exc).__name__}: {exc}", state="unreachable",
                                     reasons=[str(exc)], waited_s=self.clock() - start) from exc
            else:
                answered = True
                body = json_or_none(resp.content)
                body = body if isinstance(body, dict) else {}
                if resp.status_code == 200:
                    self.ready = True
                    return body
                state = str(body.get("state") or f"HTTP {resp.status_code}")
                reasons = [str(r) for r in body.get("reasons") or [] if r] or (
                    [str(body.get("detail"))] if body.get("detail") else []
                )
                final_state = resp.status_code != 503 or state == "failed"
                if final_state and endpoint is not None:
                    final[endpoint] = state
                    assert self.replicas is not None
                    final_state = all(u in final for u in self.replicas.urls)
                if final_state:
                    raise ServerNotReady(
                        f"{self.base_url} is not ready: {state}" + (f" ({'; '.join(reasons)})" if reasons else ""),
                        state=state, reasons=reasons, waited_s=self.clock() - start,
                    )
                retry_after = parse_retry_after(resp.headers.get("retry-after"), now=self.wallclock())
            waited = self.clock() - start
            remaining = limit - waited
            if remaining <= 0:
                raise ServerNotReady(
                    f"{self.base_url} not ready after {waited:.1f}s: {state}"
                    + (f" ({'; '.join(reasons)})" if reasons else ""),
                    state=state, reasons=reasons, waited_s=waited,
                )
            if not answered and grace is not None and waited >= grace:
                raise ServerNotReady(
                    f"nothing answers at {self.base_url} ({'; '.join(reasons)}; {waited:.1f}s): check the URL and "
                    "port, or pass wait_ready=<seconds> to wait for a server that is still starting",
                    state=state, reasons=reasons, waited_s=waited,
                )
            if waited >= next_log:
                log.warning("kawhi_client: waiting for %s/readyz: %s%s (%.0fs of %.0fs)", self.base_url, state,
                            f" ({'; '.join(reasons)})" if reasons else "", waited, limit)
                next_log = waited + READY_LOG_EVERY_S
            wait = retry_after if retry_after is not None else interval
            interval = min(2.0, interval * 2)
            yield Sleep(max(0.0, min(wait, 5.0, remaining)))

    def ensure_ready(self) -> Job:
        if not self.ready:
            yield from self.wait_ready_job()

    def info_job(self, refresh: bool = False) -> Job:
        if self.info is not None and not refresh:
            return self.info
        yield from self.ensure_ready()
        resp = yield from self.exchange("GET", "/v1/info", timeout=self.timeouts.for_tokens(0))
        info = json_or_none(resp.content)
        if not isinstance(info, dict):
            raise ProtocolError("GET /v1/info did not answer a JSON object", request_id=resp.headers.get("x-request-id"))
        self.info = info
        self.limits = Limits.from_info(info)
        return info

