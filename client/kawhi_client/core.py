"""The job/transport core shared by ``Client`` and ``AsyncClient`` (docs/api.md over httpx).

Both classes expose the same methods (``reweight``, ``reweight_response``,
``upload_image``, ``info``, ``wait_ready``); the async ones are coroutines. All the
logic — request building, image upload, splitting, the retry policy, error parsing —
is written once, in the "sans-I/O" style: each operation is a generator that *yields*
what it needs done (``_Call``: send this HTTP request; ``_Sleep``: wait; ``_Parallel``:
run these jobs concurrently) and receives the outcome. ``Client`` drives those
generators with ``httpx.Client``, ``time.sleep`` and a thread pool; ``AsyncClient``
with ``httpx.AsyncClient``, ``asyncio.sleep`` and tasks. Only the two small drivers
differ.

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

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from kawhi_client.actions import Call, Job, Lookup, Parallel, Sleep, check_action, resume  # noqa: F401 (re-exported)
from kawhi_client.affinity import HUNG_COOLDOWN_S, HUNG_EXCEPTIONS, ReplicaJobs, ReplicaTimeout
from kawhi_client.config import (
    DEFAULT_READY_TIMEOUT_S,
    READY_LOG_EVERY_S,
    READY_LOG_FIRST_S,
    ClientConfig,
    ClientStats,
    Limits,
    parse_retry_after,
)
from kawhi_client.errors import (
    ImageNotFound,
    InvalidRequest,
    KawhiConnectionError,
    KawhiError,
    KawhiHTTPError,
    KawhiTimeout,
    PayloadTooLarge,
    ProtocolError,
    ServerNotReady,
    client_problem,
    error_from_response,
)
from kawhi_client.images import HeldImages, ImageInputError, LoadedImage, load_image
from kawhi_client.planning import (
    IMAGE_TOKENS_ESTIMATE,
    GroupLike,
    OptionsLike,
    PreparedGroup,
    body_overhead,
    build_body,
    merge_responses,
    new_request_id,
    options_json,
    plan_chunks,
    prepare_groups,
    remap_error,
    remap_problem,
    sha_at,
)
from kawhi_client.replicas import ReplicaSet
from kawhi_client.routing import ROUTING_HEADER, request_routing_key
from kawhi_client.schema import ReweightResponse

log = logging.getLogger("kawhi_client")

PROBLEM_IMAGE_NOT_FOUND = "image-not-found"

# httpx errors worth another attempt: the network, a dropped connection, a timeout.
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class Core(ReplicaJobs):
    """Everything the two clients share: configuration, caches, counters, and the
    operations as generator jobs (see the module doc)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        rng: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
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
        self.replicas = (
            ReplicaSet(config.replicas, resolve_every=config.resolve_every) if config.replicas is not None else None
        )
        self.shared_images = config.shared_image_cache
        self.wire = config.wire  # see planning.wire_fields
        self._known = HeldImages()  # sha256, or "<replica> <sha256>" per replica

    # ------------------------------------------------------------------ image hashes
    def _known_key(self, sha: str, replica: str | None) -> str:
        if self.replicas is None or self.shared_images or replica is None:
            return sha
        return f"{replica} {sha}"

    def is_known(self, sha: str, replica: str | None = None) -> bool:
        return self._known_key(sha, replica) in self._known

    def remember(self, sha: str, replica: str | None = None) -> None:
        self._known.add(self._known_key(sha, replica))

    def forget(self, sha: str, replica: str | None = None) -> None:
        self._known.discard(self._known_key(sha, replica))

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
                            endpoint, method, path, failure.seconds, HUNG_COOLDOWN_S, rid)
            if endpoint is not None and self._fail_over(failure, endpoint, retry_after, failed_replicas, attempt):
                self.stats.add(retries=1, failovers=1)
                log.info("kawhi: %s %s attempt %d failed on %s (%s); trying the next replica [request_id=%s]",
                         method, path, attempt, endpoint, _describe(failure), rid)
                continue
            wait = self.retry.delay(attempt, retry_after=retry_after, elapsed=self.clock() - start, rng=self.rng)
            if wait is None:
                raise self._final_error(failure, method, path, rid, attempt, retry_after, timeout)
            self.stats.add(retries=1)
            log.info(
                "kawhi: %s %s attempt %d failed (%s); retrying in %.2fs [request_id=%s]",
                method, path, attempt, _describe(failure), wait, rid,
            )
            yield Sleep(wait)

    def _http_error(
        self, resp: httpx.Response, rid: str, attempts: int, retry_after: float | None
    ) -> KawhiHTTPError:
        return error_from_response(
            resp.status_code, resp.content, reason=resp.reason_phrase, headers=resp.headers, request_id=rid,
            attempts=attempts, retry_after=retry_after,
        )

    def _final_error(
        self, failure: Any, method: str, path: str, rid: str, attempts: int, retry_after: float | None,
        timeout: httpx.Timeout,
    ) -> KawhiError:
        if isinstance(failure, httpx.Response):
            return self._http_error(failure, rid, attempts, retry_after)
        where = f"{method} {self.base_url}{path}"
        if isinstance(failure, httpx.TimeoutException):
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

    # ------------------------------------------------------------------ readiness, info
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
                body = _json_or_none(resp.content)
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
        info = _json_or_none(resp.content)
        if not isinstance(info, dict):
            raise ProtocolError("GET /v1/info did not answer a JSON object", request_id=resp.headers.get("x-request-id"))
        self.info = info
        self.limits = Limits.from_info(info)
        return info

    # ------------------------------------------------------------------ images
    def upload_job(self, image: LoadedImage, *, reupload: bool = False, route: str | None = None) -> Job:
        """``POST /v1/images`` with the bytes exactly as given; returns the sha256.
        ``route``: the routing key of a group that will use the image (the upload goes
        where that group's requests go)."""
        assert image.data is not None
        timeout = self.timeouts.for_tokens(IMAGE_TOKENS_ESTIMATE)
        where: dict[str, Any] = {}
        resp = yield from self.exchange(
            "POST", "/v1/images", timeout=timeout, content=image.data, content_type=image.content_type,
            route=route, where=where, tokens=IMAGE_TOKENS_ESTIMATE,
        )
        body = _json_or_none(resp.content)
        sha = body.get("sha256") if isinstance(body, dict) else None
        if not isinstance(sha, str) or sha.lower() != image.sha256:
            raise ProtocolError(
                f"the server stored the image as {sha!r}, not {image.sha256} (the bytes changed in transit?)",
                request_id=resp.headers.get("x-request-id"),
            )
        self.remember(image.sha256, where.get("url"))
        self.stats.add(images_uploaded=1, image_bytes_uploaded=len(image.data), image_reuploads=int(reupload))
        return image.sha256

    def upload_image_job(self, image: Any) -> Job:
        try:
            loaded = load_image(image)
        except ImageInputError as exc:
            raise InvalidRequest(client_problem(exc.detail, "/image" + (f"/{exc.field}" if exc.field else "")),
                                 attempts=0) from exc
        if loaded.data is None:
            raise InvalidRequest(client_problem("upload_image needs the image bytes, not a hash", "/image/sha256"),
                                 attempts=0)
        yield from self.ensure_ready()
        return (yield from self.upload_job(loaded))

    # ------------------------------------------------------------------ reweight
    def reweight_job(
        self,
        groups: Iterable[GroupLike],
        options: OptionsLike,
        option_kwargs: Mapping[str, Any],
        per_group_errors: bool,
        request_id: str | None,
    ) -> Job:
        groups = list(groups)
        opts = options_json(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, per_group_errors)
        info = yield from self.info_job()  # waits for /readyz first
        limits = self.limits or Limits()

        todo = [g for g in prepared if g is not None]
        owners = yield from self.owners(todo)

        uploads: dict[str, Job] = {}  # one upload per image and replica that will use it
        for owner, mine in owners.items():
            for g in mine:
                img = images.get(g.sha256)
                known_key = self._known_key(g.sha256, owner)
                if img is not None and img.data is not None and known_key not in uploads \
                        and not self.is_known(g.sha256, owner):
                    uploads[known_key] = self.upload_job(img, route=g.route)
        if uploads:
            yield Parallel(list(uploads.values()))

        runs: list[list[PreparedGroup]] = []
        for mine in owners.values():
            runs += [[mine[p] for p in run] for run in plan_chunks(
                [(len(g.json), g.tokens) for g in mine],
                max_groups=limits.groups_per_request(self.max_in_flight, self.max_groups_per_request),
                max_bytes=max(1024, limits.max_body_bytes - 1024),
                max_tokens=limits.max_request_tokens,
                overhead=body_overhead(opts, per_group_errors, self.wire),
            )]
        prefix = request_id or new_request_id()
        jobs = []
        for k, run in enumerate(runs):
            rid = prefix if len(runs) == 1 else f"{prefix}.{k}"
            jobs.append(self.chunk_job(run, opts, per_group_errors, images, rid, set()))
        answers = (yield Parallel(jobs)) if jobs else []
        pieces = [piece for answer in answers for piece in answer]
        return merge_responses(len(groups), pieces, failed, info)

    def chunk_job(
        self,
        chunk: list[PreparedGroup],
        opts: bytes | None,
        per_group_errors: bool,
        images: Mapping[str, LoadedImage],
        request_id: str,
        reuploaded: set[tuple[str | None, str]],
        resend_evicted: bool = True,
    ) -> Job:
        """One ``POST /v1/reweight`` for these groups (with the eviction and 413 recoveries);
        returns ``[(caller indices, ReweightResponse), ...]``. ``reuploaded`` holds the
        (replica, sha256) pairs uploaded again already: once each."""
        indices = [g.index for g in chunk]
        route = request_routing_key([g.route for g in chunk])
        where: dict[str, Any] = {}

        def reuploadable(sha: str | None) -> bool:
            img = images.get(sha or "")
            return img is not None and img.data is not None and (where.get("url"), sha) not in reuploaded

        def reupload(sha: str) -> Job:
            reuploaded.add((where.get("url"), sha))
            self.forget(sha, where.get("url"))
            log.info("kawhi: %s no longer holds image %s; uploading it again", where.get("url"), sha)
            yield from self.upload_job(images[sha], reupload=True, route=route)

        while True:
            body = build_body([g.json for g in chunk], opts, per_group_errors, self.wire)
            tokens = sum(g.tokens for g in chunk)
            try:
                resp = yield from self.exchange(
                    "POST", "/v1/reweight", timeout=self.timeouts.for_tokens(tokens), content=body,
                    content_type="application/json", request_id=request_id, route=route, where=where, tokens=tokens,
                )
            except ImageNotFound as err:
                sha = err.sha256 or sha_at(err.pointer, chunk)
                if sha and reuploadable(sha):
                    yield from reupload(sha)
                    continue
                raise remap_error(err, indices) from err
            except PayloadTooLarge as err:
                if len(chunk) > 1 and (err.pointer or "") in ("", "/groups"):
                    # a limit the client could only estimate (tokens): split and go on
                    self.stats.add(splits_on_413=1)
                    half = len(chunk) // 2
                    left = yield from self.chunk_job(chunk[:half], opts, per_group_errors, images,
                                                     request_id + ".a", reuploaded)
                    right = yield from self.chunk_job(chunk[half:], opts, per_group_errors, images,
                                                      request_id + ".b", reuploaded)
                    return left + right
                raise remap_error(err, indices) from err
            except KawhiHTTPError as err:
                raise remap_error(err, indices) from err
            break

        rid = resp.headers.get("x-request-id") or request_id
        try:
            parsed = ReweightResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise ProtocolError(f"POST /v1/reweight answered an invalid body: {exc}", request_id=rid) from None
        if len(parsed.results) != len(chunk):
            raise ProtocolError(
                f"POST /v1/reweight answered {len(parsed.results)} results for {len(chunk)} groups", request_id=rid
            )
        for g, r in zip(chunk, parsed.results):
            if g.id is not None and r.id is not None and r.id != g.id:
                raise ProtocolError(f"result for group {g.index} has id {r.id!r}, expected {g.id!r}", request_id=rid)
            if r.error is not None:
                r.error = remap_problem(r.error, indices)
        self.stats.add(reweight_requests=1, groups=len(chunk))
        pieces: list[tuple[list[int], ReweightResponse]] = [(indices, parsed)]

        if per_group_errors and resend_evicted:
            # groups whose image was evicted between upload and use: upload it again, once, and redo them
            evicted = [
                g for g, r in zip(chunk, parsed.results)
                if r.error is not None and r.error.status == 404 and r.error.type.endswith(PROBLEM_IMAGE_NOT_FOUND)
                and images.get(g.sha256) is not None and images[g.sha256].data is not None
            ]
            for sha in dict.fromkeys(g.sha256 for g in evicted):
                if (where.get("url"), sha) not in reuploaded:
                    yield from reupload(sha)
            if evicted:
                pieces += yield from self.chunk_job(evicted, opts, per_group_errors, images, request_id + ".r",
                                                    reuploaded, resend_evicted=False)
        return pieces


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content) if content else None
    except (ValueError, UnicodeDecodeError):
        return None


def _describe(failure: Any) -> str:
    if isinstance(failure, httpx.Response):
        return f"HTTP {failure.status_code}"
    return type(failure).__name__


