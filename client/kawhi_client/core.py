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
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterable, Mapping, Optional

import httpx
from pydantic import ValidationError

from kawhi_client.config import DEFAULT_READY_TIMEOUT_S, ClientConfig, ClientStats, Limits, parse_retry_after
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
from kawhi_client.images import ImageInputError, LoadedImage, load_image
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
from kawhi_client.schema import ReweightResponse

log = logging.getLogger("kawhi_client")

PROBLEM_IMAGE_NOT_FOUND = "image-not-found"

@dataclass
class Call:
    """Send one HTTP request; the driver answers the httpx.Response (body read) or
    throws the httpx exception into the job."""

    method: str
    path: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    content: Optional[bytes] = None


@dataclass
class Sleep:
    seconds: float


@dataclass
class Parallel:
    """Run these jobs concurrently, each holding one of the ``max_in_flight`` slots for
    its whole life (retries and waits included); answers their results in order. Inside
    a job (already holding a slot) the jobs run one after another in that slot."""

    jobs: list[Generator[Any, Any, Any]]


Job = Generator[Any, Any, Any]

# httpx errors worth another attempt: the network, a dropped connection, a timeout.
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class Core:
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
        self.info: Optional[dict[str, Any]] = None
        self.limits: Optional[Limits] = None
        self._known: dict[str, None] = {}  # sha256 of images the server was sent (insertion-ordered)
        self._known_max = 100_000
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ image hashes
    def is_known(self, sha: str) -> bool:
        with self._lock:
            return sha in self._known

    def remember(self, sha: str) -> None:
        with self._lock:
            self._known[sha] = None
            while len(self._known) > self._known_max:
                del self._known[next(iter(self._known))]

    def forget(self, sha: str) -> None:
        with self._lock:
            self._known.pop(sha, None)

    # ------------------------------------------------------------------ one request, retried
    def exchange(
        self,
        method: str,
        path: str,
        *,
        timeout: httpx.Timeout,
        content: Optional[bytes] = None,
        content_type: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> Job:
        """Send one request, retrying transient failures; returns the 2xx response
        or raises the typed error. The same X-Request-ID goes with every attempt."""
        rid = request_id or new_request_id()
        headers = {"X-Request-ID": rid}
        if content_type:
            headers["Content-Type"] = content_type
        call = Call(method, path, headers, timeout, content)
        start = self.clock()
        attempt = 0
        while True:
            attempt += 1
            self.stats.add(http_requests=1)
            retry_after: Optional[float] = None
            failure: Any
            try:
                resp = yield call
            except RETRY_EXCEPTIONS as exc:
                failure = exc
            except httpx.HTTPError as exc:  # a bad URL, an unsupported scheme ...: retrying cannot help
                raise KawhiConnectionError(
                    f"{method} {self.base_url}{path} failed: {type(exc).__name__}: {exc}", request_id=rid,
                    attempts=attempt,
                ) from exc
            else:
                status = resp.status_code
                if status < 300:
                    return resp
                if status not in self.retry.statuses:
                    raise self._http_error(resp, rid, attempt, None)
                failure = resp
                retry_after = parse_retry_after(resp.headers.get("retry-after"), now=self.wallclock())
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
        self, resp: httpx.Response, rid: str, attempts: int, retry_after: Optional[float]
    ) -> KawhiHTTPError:
        return error_from_response(
            resp.status_code, resp.content, reason=resp.reason_phrase, headers=resp.headers, request_id=rid,
            attempts=attempts, retry_after=retry_after,
        )

    def _final_error(
        self, failure: Any, method: str, path: str, rid: str, attempts: int, retry_after: Optional[float],
        timeout: httpx.Timeout,
    ) -> KawhiError:
        if isinstance(failure, httpx.Response):
            return self._http_error(failure, rid, attempts, retry_after)
        where = f"{method} {self.base_url}{path}"
        if isinstance(failure, httpx.TimeoutException):
            return KawhiTimeout(
                f"{where}: no answer in time ({type(failure).__name__}; read timeout {timeout.read:.1f}s) "
                f"after {attempts} attempt(s) [request_id={rid}]",
                request_id=rid, attempts=attempts,
            )
        return KawhiConnectionError(
            f"{where}: {type(failure).__name__}: {failure} after {attempts} attempt(s) [request_id={rid}]",
            request_id=rid, attempts=attempts,
        )

    # ------------------------------------------------------------------ readiness, info
    def wait_ready_job(self, timeout: Optional[float] = None) -> Job:
        """Poll ``GET /readyz`` until it says ready (200), for at most ``timeout`` seconds.

        Connection errors and 503 (loading) are waited out, honouring Retry-After;
        ``failed`` (the model did not load) or any other status ends the wait at once.
        """
        limit = self.ready_timeout if timeout is None else timeout
        limit = DEFAULT_READY_TIMEOUT_S if limit is None else float(limit)
        start = self.clock()
        interval = 0.25
        state: Optional[str] = None
        reasons: list[str] = []
        while True:
            retry_after: Optional[float] = None
            remaining = limit - (self.clock() - start)
            probe_timeout = httpx.Timeout(max(0.5, min(10.0, remaining)), connect=max(0.5, min(5.0, remaining)))
            try:
                resp = yield Call("GET", "/readyz", {"X-Request-ID": new_request_id()}, probe_timeout)
            except RETRY_EXCEPTIONS as exc:  # not up yet: wait it out
                state, reasons = "unreachable", [f"{type(exc).__name__}: {exc}"]
            except httpx.HTTPError as exc:  # a bad URL, an unsupported scheme ...: waiting cannot help
                raise ServerNotReady(f"{self.base_url}/readyz: {type(exc).__name__}: {exc}", state="unreachable",
                                     reasons=[str(exc)], waited_s=self.clock() - start) from exc
            else:
                body = _json_or_none(resp.content)
                body = body if isinstance(body, dict) else {}
                if resp.status_code == 200:
                    self.ready = True
                    return body
                state = str(body.get("state") or f"HTTP {resp.status_code}")
                reasons = [str(r) for r in body.get("reasons") or [] if r] or (
                    [str(body.get("detail"))] if body.get("detail") else []
                )
                if resp.status_code != 503 or state == "failed":
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
    def upload_job(self, image: LoadedImage, *, reupload: bool = False) -> Job:
        """``POST /v1/images`` with the bytes exactly as given; returns the sha256."""
        assert image.data is not None
        timeout = self.timeouts.for_tokens(IMAGE_TOKENS_ESTIMATE)
        resp = yield from self.exchange(
            "POST", "/v1/images", timeout=timeout, content=image.data, content_type=image.content_type
        )
        body = _json_or_none(resp.content)
        sha = body.get("sha256") if isinstance(body, dict) else None
        if not isinstance(sha, str) or sha.lower() != image.sha256:
            raise ProtocolError(
                f"the server stored the image as {sha!r}, not {image.sha256} (the bytes changed in transit?)",
                request_id=resp.headers.get("x-request-id"),
            )
        self.remember(image.sha256)
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
        request_id: Optional[str],
    ) -> Job:
        groups = list(groups)
        opts = options_json(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, per_group_errors)
        info = yield from self.info_job()  # waits for /readyz first
        limits = self.limits or Limits()

        uploads = [img for sha, img in images.items() if img.data is not None and not self.is_known(sha)]
        if uploads:
            yield Parallel([self.upload_job(img) for img in uploads])

        todo = [g for g in prepared if g is not None]
        runs = plan_chunks(
            [(len(g.json), g.tokens) for g in todo],
            max_groups=limits.groups_per_request(self.max_in_flight, self.max_groups_per_request),
            max_bytes=max(1024, limits.max_body_bytes - 1024),
            max_tokens=limits.max_request_tokens,
            overhead=body_overhead(opts, per_group_errors),
        )
        prefix = request_id or new_request_id()
        jobs = []
        for k, run in enumerate(runs):
            rid = prefix if len(runs) == 1 else f"{prefix}.{k}"
            jobs.append(self.chunk_job([todo[p] for p in run], opts, per_group_errors, images, rid, set()))
        answers = (yield Parallel(jobs)) if jobs else []
        pieces = [piece for answer in answers for piece in answer]
        return merge_responses(len(groups), pieces, failed, info)

    def chunk_job(
        self,
        chunk: list[PreparedGroup],
        opts: Optional[bytes],
        per_group_errors: bool,
        images: Mapping[str, LoadedImage],
        request_id: str,
        reuploaded: set[str],
        resend_evicted: bool = True,
    ) -> Job:
        """One ``POST /v1/reweight`` for these groups (with the eviction and 413 recoveries);
        returns ``[(caller indices, ReweightResponse), ...]``."""
        indices = [g.index for g in chunk]

        def reuploadable(sha: Optional[str]) -> bool:
            img = images.get(sha or "")
            return img is not None and img.data is not None and sha not in reuploaded

        def reupload(sha: str) -> Job:
            reuploaded.add(sha)
            self.forget(sha)
            log.info("kawhi: the server no longer holds image %s; uploading it again", sha)
            yield from self.upload_job(images[sha], reupload=True)

        while True:
            body = build_body([g.json for g in chunk], opts, per_group_errors)
            timeout = self.timeouts.for_tokens(sum(g.tokens for g in chunk))
            try:
                resp = yield from self.exchange(
                    "POST", "/v1/reweight", timeout=timeout, content=body, content_type="application/json",
                    request_id=request_id,
                )
            except ImageNotFound as err:
                sha = err.sha256 or sha_at(err.pointer, chunk)
                if sha and reuploadable(sha):
                    yield from reupload(sha)
                    continue
                raise remap_error(err, indices)
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
                raise remap_error(err, indices)
            except KawhiHTTPError as err:
                raise remap_error(err, indices)
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
                if sha not in reuploaded:
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


def resume(job: Job, value: Any, error: Optional[BaseException]) -> tuple[bool, Any]:
    """Advance a job: (True, its return value) when it is done, else (False, next action)."""
    try:
        action = job.throw(error) if error is not None else job.send(value)
    except StopIteration as stop:
        return True, stop.value
    return False, action


def check_action(action: Any) -> None:
    if not isinstance(action, (Call, Sleep, Parallel)):
        raise TypeError(f"kawhi_client: a job yielded {action!r}")
