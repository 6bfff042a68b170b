"""The sans-I/O core shared by every client: ``Client`` and ``AsyncClient`` (HTTP, docs/api.md
over httpx) and ``GrpcClient`` and ``AsyncGrpcClient`` (kawhi.v1 over grpcio).

All expose the same methods (``reweight``, ``reweight_response``, ``upload_image``,
``info``, ``wait_ready``); the async ones are coroutines. All the logic — request
planning, image upload, splitting, the retry policy, replicas and failover, error parsing
— is written once, in the "sans-I/O" style: each operation is a generator that *yields*
what it needs done (``kawhi_client.actions``: ``Call`` this endpoint; ``Sleep``;
``Parallel``: run these jobs concurrently) and receives the outcome. The drivers
(``kawhi_client.drivers``) run those generators with threads or tasks; each client only
says how a ``Call`` is sent (httpx, or the gRPC stub call it stands for), and a dialect
(``kawhi_client.dialect``) how a reweight request is encoded and its answer decoded.

Where the jobs live: this module (``Core``: state, image hashes, one exchange retried and
failed over), ``kawhi_client.readiness`` (wait-ready, info), ``kawhi_client.reweighting``
(uploads, packing, eviction re-upload, 413 split), ``kawhi_client.affinity`` (replica
choice, failover).

The life of ``reweight(groups)``:

1. every group is checked locally against the wire schema and its image loaded
   (bytes / path / base64 / hash — never decoded, never re-encoded);
2. on the first call, wait for ``GET /readyz`` to say ready (bounded), then read
   ``GET /v1/info`` once for the limits;
3. each distinct image the client has not sent before is uploaded once
   (``POST /v1/images``, the raw bytes) and referenced by its sha256 from then on;
4. the groups are packed, in order, into requests that respect the advertised limits
   (groups, body bytes, tokens) and sent concurrently, at most ``max_in_flight``
   requests at a time — a request holds its slot through its retries, so retries
   never add load beyond the cap;
5. transient failures (429, 502, 503, 504, connection errors, timeouts) are retried
   with exponential backoff and full jitter, honouring ``Retry-After``; nothing else is;
6. an image the server evicted (404 for its hash) is uploaded again, once, and the
   request repeated; a 413 for a whole request (a limit the client could only
   estimate) splits it in two;
7. results come back in input order; errors are typed exceptions carrying the
   problem+json, with pointers rewritten to index the caller's list.

With several replicas (``replicas=``, see ``kawhi_client.replicas``) every group has a
routing key (``kawhi_client.routing``) and an owner, the replica that rendezvous
hashing ranks first for it among the healthy ones: groups are packed per owner, each
image is uploaded to the owners that will use it, and each request goes to its
groups' owner. A connection error, 503 or 429 marks that replica down and the next
attempt goes at once to the key's next choice (a failover). With one endpoint the
requests only carry the routing key as a header, for an ingress that hashes on it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from kawhi_client.actions import RETRY_EXCEPTIONS, Call, Job, Lookup, Parallel, Sleep, check_action, resume  # noqa: F401 (re-exported)
from kawhi_client.affinity import HUNG_COOLDOWN_S, HUNG_EXCEPTIONS, ReplicaJobs, ReplicaTimeout
from kawhi_client.config import ClientConfig, ClientStats, Limits, RetryPolicy, Timeouts, parse_retry_after
from kawhi_client.dialect import HttpDialect
from kawhi_client.errors import KawhiConnectionError, KawhiError, KawhiHTTPError, KawhiTimeout, error_from_response
from kawhi_client.images import HeldImages
from kawhi_client.planning import new_request_id
from kawhi_client.readiness import ReadinessJobs
from kawhi_client.replicas import ReplicaSet
from kawhi_client.reweighting import PROBLEM_IMAGE_NOT_FOUND, ReweightJobs  # noqa: F401 (re-exported)
from kawhi_client.routing import ROUTING_HEADER

log = logging.getLogger("kawhi_client")


class Core(ReplicaJobs, ReadinessJobs, ReweightJobs):
    """Everything the clients share: configuration, caches, counters, and the operations
    as generator jobs (see the module doc). ``dialect``: how a reweight request is put on
    the wire (``HttpDialect`` unless given; ``GrpcDialect`` for the gRPC clients)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        rng: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
        dialect: Any = None,
    ) -> None:
        self.config = config
        self.base_url = config.base_url
        self.timeouts = config.timeouts
        self.retry = config.retry
        self.max_in_flight = config.max_in_flight
        self.ready_timeout = config.ready_timeout
        self.ready = self.ready_timeout is None
        self.max_groups_per_request = config.max_groups_per_request
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.wallclock = wallclock
        self.stats = ClientStats()
        self.info: dict[str, Any] | None = None
        self.limits: Limits | None = None
        self.dialect = dialect if dialect is not None else HttpDialect(config.wire)
        self.replicas = (
            ReplicaSet(config.replicas, resolve_every=config.resolve_every, schemes=self.dialect.replica_schemes)
            if config.replicas is not None else None
        )
        self.shared_images = config.shared_image_cache
        self._known = HeldImages()  # sha256, or "<replica> <sha256>" per replica

    # ------------------------------------------------------------------ image hashes
    def known_key(self, sha: str, replica: str | None) -> str:
        if self.replicas is None or self.shared_images or replica is None:
            return sha
        return f"{replica} {sha}"

    def is_known(self, sha: str, replica: str | None = None) -> bool:
        return self.known_key(sha, replica) in self._known

    def remember(self, sha: str, replica: str | None = None) -> None:
        self._known.add(self.known_key(sha, replica))

    def forget(self, sha: str, replica: str | None = None) -> None:
        self._known.discard(self.known_key(sha, replica))

    # ------------------------------------------------------------------ one request, retried
    def exchange(
        self,
        method: str,
        path: str,
        *,
        timeout: httpx.Timeout,
        content: bytes | None = None,
        content_type: str | None = None,
        request_id: str | None = None,
        route: str | None = None,
        where: dict[str, Any] | None = None,
        tokens: int = 0,
    ) -> Job:
        """Send one request, retrying transient failures; returns the 2xx response
        or raises the typed error. The same X-Request-ID goes with every attempt.

        ``route``: the routing key, sent as a header; with several replicas it also
        picks the replica of each attempt (failing over as the module doc says).
        ``where["url"]`` is set to the replica of the latest attempt. ``tokens``: the
        estimated work, which sets the failover timeout (``Timeouts.for_failover``) of an
        attempt that another healthy replica could take over."""
        rid = request_id or new_request_id()
        headers = {"X-Request-ID": rid}
        if content_type:
            headers["Content-Type"] = content_type
        if route:
            headers[ROUTING_HEADER] = route
        start = self.clock()
        attempt = 0
        failed_replicas: set[str] = set()
        while True:
            attempt += 1
            endpoint: str | None = None
            if self.replicas is not None:
                endpoint = yield from self.choose_replica(route or rid, failed_replicas)
            if where is not None:
                where["url"] = endpoint or self.base_url
            self.stats.add(http_requests=1)
            retry_after: float | None = None
            failure: Any
            attempt_timeout = self.attempt_timeout(endpoint, failed_replicas, attempt, tokens) or timeout
            sent = self.clock()
            try:
                if self.replicas is not None and endpoint is None:
                    raise httpx.ConnectError(f"no replica of {self.replicas.description} is known yet")
                resp = yield Call(method, path, headers, attempt_timeout, content, endpoint)
            except RETRY_EXCEPTIONS as exc:
                failure = exc
                if attempt_timeout is not timeout and isinstance(exc, HUNG_EXCEPTIONS):
                    failure = ReplicaTimeout(exc, attempt_timeout)
            except httpx.HTTPError as exc:  # a bad URL, an unsupported scheme ...: retrying cannot help
                raise KawhiConnectionError(
                    f"{method} {endpoint or self.base_url}{path} failed: {type(exc).__name__}: {exc}", request_id=rid,
                    attempts=attempt,
                ) from exc
            else:
                status = resp.status_code
                if endpoint is not None and status < 500 and status != 429:
                    self.replicas.mark_up(endpoint)  # type: ignore[union-attr]
                if status < 300:
                    return resp
                if status not in self.retry.statuses:
                    raise self._http_error(resp, rid, attempt, None)
                failure = resp
                retry_after = parse_retry_after(resp.headers.get("retry-after"), now=self.wallclock())
            if isinstance(failure, ReplicaTimeout):
                self.stats.add(replica_timeouts=1)
                log.warning("kawhi: %s did not answer %s %s in %.1fs; skipping it for %.0fs [request_id=%s]",
                            endpoint, method, path, self.clock() - sent, HUNG_COOLDOWN_S, rid)
            if endpoint is not None and self._fail_over(failure, endpoint, retry_after, failed_replicas, attempt):
                self.stats.add(retries=1, failovers=1)
                log.info("kawhi: %s %s attempt %d failed on %s (%s); trying the next replica [request_id=%s]",
                         method, path, attempt, endpoint, _describe(failure), rid)
                continue
            wait = self.retry.delay(attempt, retry_after=retry_after, elapsed=self.clock() - start, rng=self.rng)
            if wait is None:
                raise self._final_error(failure, method, path, rid, attempt, retry_after, timeout, endpoint)
            self.stats.add(retries=1)
            log.info(
                "kawhi: %s %s attempt %d failed (%s); retrying in %.2fs [request_id=%s]",
                method, path, attempt, _describe(failure), wait, rid,
            )
            yield Sleep(wait)

    def _http_error(
        self, resp: Any, rid: str, attempts: int, retry_after: float | None
    ) -> KawhiHTTPError:
        return error_from_response(
            resp.status_code, resp.content, reason=resp.reason_phrase, headers=resp.headers, request_id=rid,
            attempts=attempts, retry_after=retry_after,
        )

    def _final_error(
        self, failure: Any, method: str, path: str, rid: str, attempts: int, retry_after: float | None,
        timeout: httpx.Timeout, endpoint: str | None = None,
    ) -> KawhiError:
        if not isinstance(failure, BaseException):  # an answer (httpx.Response, or a gRPC driver's reply)
            return self._http_error(failure, rid, attempts, retry_after)
        where = self.dialect.describe(method, path, endpoint or self.base_url)
        if isinstance(failure, httpx.TimeoutException):  # (the gRPC drivers throw one for DEADLINE_EXCEEDED)
            return KawhiTimeout(
                f"{where}: no answer in time ({type(failure).__name__}; read timeout "
                f"{failure.seconds if isinstance(failure, ReplicaTimeout) else timeout.read:.1f}s) "
                f"after {attempts} attempt(s) [request_id={rid}]",
                request_id=rid, attempts=attempts,
            )
        return KawhiConnectionError(
            f"{where}: {type(failure).__name__}: {failure} after {attempts} attempt(s) [request_id={rid}]",
            request_id=rid, attempts=attempts,
        )


def _describe(failure: Any) -> str:
    if not isinstance(failure, BaseException):
        return f"HTTP {failure.status_code}"
    return type(failure).__name__


class CoreViews:
    """The read-only views every client (HTTP or gRPC, sync or async) gives of its Core."""

    _core: Core

    @property
    def config(self) -> ClientConfig:
        """The resolved settings (endpoints, headers, timeouts, retry policy ...)."""
        return self._core.config

    @property
    def stats(self) -> ClientStats:
        """Counters: attempts (``http_requests``, gRPC calls included), retries, failovers,
        replica timeouts, uploads, re-uploads, requests, groups."""
        return self._core.stats

    @property
    def limits(self) -> Limits | None:
        """The limits read from the server's info (None before the first call)."""
        return self._core.limits

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._core.retry

    @property
    def timeouts(self) -> Timeouts:
        return self._core.timeouts

    @property
    def max_in_flight(self) -> int:
        return self._core.max_in_flight
