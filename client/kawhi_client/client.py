"""``Client`` and ``AsyncClient``: the KAWHI HTTP API (shared/API.md) over httpx.

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

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Generator, Iterable, Mapping, Optional, Sequence, Union

import httpx
from pydantic import ValidationError

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
from kawhi_client.schema import (
    GroupResult,
    Options,
    Problem,
    ReweightResponse,
    RolloutGroup,
    Usage,
)

log = logging.getLogger("kawhi_client")

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_READY_TIMEOUT_S = 600.0
PROBLEM_IMAGE_NOT_FOUND = "image-not-found"

GroupLike = Union[RolloutGroup, Mapping[str, Any]]
OptionsLike = Union[Options, Mapping[str, Any], None]


def _client_version() -> str:
    try:
        from importlib.metadata import version

        return version("kawhi")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0"


USER_AGENT = f"kawhi-client/{_client_version()} httpx/{httpx.__version__}"


# ============================================================================ policy


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Only transient failures are retried: the statuses in ``statuses`` (429, 502, 503,
    504), connection errors and timeouts. Attempt ``n`` (1-based) that failed waits

    * ``Retry-After`` seconds plus up to ``backoff`` seconds of jitter when the server
      sent that header (a ``Retry-After`` above ``max_retry_after`` gives up at once);
    * otherwise a uniform random time in ``[0, min(max_backoff, backoff * 2**(n-1))]``
      ("full jitter"),

    and the request gives up after ``max_attempts`` attempts or when the next wait would
    take it past ``give_up_after`` seconds since its first attempt (the retry budget).
    """

    max_attempts: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    give_up_after: float = 900.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff must not be negative")

    def delay(
        self,
        attempt: int,
        *,
        retry_after: Optional[float] = None,
        elapsed: float = 0.0,
        rng: Any = random,
    ) -> Optional[float]:
        """Seconds to wait after failed attempt ``attempt``, or None to give up."""
        if attempt >= self.max_attempts:
            return None
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            wait = retry_after + rng.uniform(0.0, min(cap, self.backoff))
        else:
            wait = rng.uniform(0.0, cap)
        if elapsed + wait > self.give_up_after:
            return None
        return wait


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """``Retry-After`` (RFC 9110: delay-seconds or an HTTP-date) -> seconds from now.

    ``now`` is the wall-clock time (``time.time()``) the date is measured from. A date in
    the past is 0; a value that is neither form is None (ignored).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        import datetime as _dt

        when = when.replace(tzinfo=_dt.timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class Timeouts:
    """Per-request timeouts that grow with the work sent.

    The read timeout of a request is ``base + per_token * tokens``, where ``tokens`` is
    the client's (generous) estimate of the tokens the request makes the server process
    (see ``estimate_tokens``), so the longest rollouts are never cut off by a fixed
    short timeout. ``connect`` bounds making a connection; ``base`` also bounds writing
    the body and waiting for a pooled connection.
    """

    base: float = 60.0
    per_token: float = 0.002
    connect: float = 10.0

    def read_timeout(self, tokens: int) -> float:
        return self.base + self.per_token * max(0, tokens)

    def for_tokens(self, tokens: int) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read_timeout(tokens), write=self.base, pool=self.base)


@dataclass(frozen=True)
class Limits:
    """What one request may hold, from ``GET /v1/info`` (``limits`` and ``server``)."""

    max_groups: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_request_tokens: int = 1_048_576
    queue_groups: Optional[int] = None
    max_responses: Optional[int] = None
    max_response_tokens: Optional[int] = None
    max_group_tokens: Optional[int] = None
    max_image_bytes: Optional[int] = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "Limits":
        lim = dict(info.get("limits") or {})
        srv = dict(info.get("server") or {})
        d = cls()

        def pick(*names: str, default: Any = None, src: Mapping[str, Any] = lim) -> Any:
            for n in names:
                v = src.get(n)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                    return int(v)
            return default

        return cls(
            max_groups=pick("max_groups", "max_groups_per_request", default=d.max_groups),
            max_body_bytes=pick("max_body_bytes", "max_request_bytes", default=d.max_body_bytes),
            max_request_tokens=pick("max_request_tokens", default=d.max_request_tokens),
            queue_groups=pick("queue_groups", src=srv) or pick("queue_groups"),
            max_responses=pick("max_responses"),
            max_response_tokens=pick("max_response_tokens"),
            max_group_tokens=pick("max_group_tokens"),
            max_image_bytes=pick("max_image_bytes"),
        )

    def groups_per_request(self, max_in_flight: int, cap: Optional[int] = None) -> int:
        """Groups per request: the server's limit, and never so many that ``max_in_flight``
        full requests from this client alone would overflow the server's queue."""
        n = self.max_groups
        if self.queue_groups:
            n = min(n, max(1, self.queue_groups // max(1, max_in_flight)))
        if cap:
            n = min(n, cap)
        return max(1, n)


@dataclass
class ClientStats:
    """Counters of one client (thread-safe increments); ``snapshot()`` -> dict."""

    http_requests: int = 0  # HTTP attempts sent, retries included
    retries: int = 0
    reweight_requests: int = 0  # successful POST /v1/reweight
    groups: int = 0  # groups answered
    images_uploaded: int = 0
    image_bytes_uploaded: int = 0
    image_reuploads: int = 0  # uploads repeated because the server had evicted the hash
    splits_on_413: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


# ============================================================================ pure helpers


IMAGE_TOKENS_ESTIMATE = 1280  # visual tokens assumed per image when estimating work


def _text_tokens(text: str) -> int:
    # generous: byte-level BPE tokens average ~4 bytes of English; assume 2
    return len(text.encode("utf-8", "surrogatepass")) // 2 + 1


def estimate_tokens(group: Mapping[str, Any]) -> int:
    """A generous estimate of the tokens the server processes for one wire group
    (prefix + responses); used for timeouts and for packing requests under
    ``max_request_tokens`` (a request the server still finds too large is split)."""
    n = IMAGE_TOKENS_ESTIMATE
    if group.get("prompt") is not None:
        n += _text_tokens(str(group["prompt"]))
    if group.get("messages") is not None:
        n += _text_tokens(json.dumps(group["messages"], default=str))
    for r in group.get("responses") or ():
        ids = r.get("token_ids")
        n += len(ids) if ids is not None else _text_tokens(str(r.get("text", "")))
    return n


def plan_chunks(
    sizes: Sequence[tuple[int, int]],
    *,
    max_groups: int,
    max_bytes: int,
    max_tokens: int,
    overhead: int = 0,
) -> list[list[int]]:
    """Pack items (``(json_bytes, tokens)`` each), in order, into runs that respect
    every limit; returns lists of item positions. An item too large on its own gets a
    run of its own (the server then names the limit it breaks)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    nbytes, ntokens = overhead, 0
    for i, (b, t) in enumerate(sizes):
        if cur and (len(cur) + 1 > max_groups or nbytes + b + 1 > max_bytes or ntokens + t > max_tokens):
            chunks.append(cur)
            cur, nbytes, ntokens = [], overhead, 0
        cur.append(i)
        nbytes += b + 1
        ntokens += t
    if cur:
        chunks.append(cur)
    return chunks


def build_body(group_jsons: Sequence[bytes], options_json: Optional[bytes], per_group_errors: bool,
               wire: bytes = b"") -> bytes:
    """The ``POST /v1/reweight`` body from already-serialised groups (``wire``: from ``wire_fields``)."""
    parts = [b'{"groups":[', b",".join(group_jsons), b"]"]
    if options_json is not None:
        parts += [b',"options":', options_json]
    if per_group_errors:
        parts.append(b',"per_group_errors":true')
    parts.append(wire)
    parts.append(b"}")
    return b"".join(parts)


def body_overhead(options_json: Optional[bytes], per_group_errors: bool, wire: bytes = b"") -> int:
    return len(build_body([], options_json, per_group_errors, wire))


def wire_fields(encoding_format: str = "float", token_arrays: bool = True) -> bytes:
    """The request fields choosing how per-token arrays come back (validated here, not on the server).

    ``encoding_format="base64"``: little-endian float32 in base64 (about 5.3 bytes per value
    instead of ~19), decoded back to lists by ``ResponseResult``; ``token_arrays=False``: no
    per-token arrays at all (the paragraphs carry spans and weights)."""
    if encoding_format not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', not {encoding_format!r}")
    parts = [b""]
    if encoding_format != "float":
        parts.append(b'"encoding_format":"' + encoding_format.encode() + b'"')
    if not token_arrays:
        parts.append(b'"token_arrays":false')
    return b",".join(parts) if len(parts) > 1 else b""


def _dumps(obj: Any) -> bytes:
    # allow_nan: a NaN/inf reward is sent as such (the service has a rule for it);
    # pydantic's JSON mode would silently turn it into null.
    return json.dumps(obj, allow_nan=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


_GROUP_POINTER = re.compile(r"^/groups/(\d+)(?=/|$)")


def remap_pointer(ptr: Optional[str], indices: Sequence[int]) -> Optional[str]:
    """``/groups/k/...`` of a sub-request -> ``/groups/indices[k]/...`` of the caller's list."""
    if not ptr:
        return ptr
    m = _GROUP_POINTER.match(ptr)
    if not m:
        return ptr
    k = int(m.group(1))
    if k >= len(indices):
        return ptr
    return f"/groups/{indices[k]}{ptr[m.end():]}"


def remap_problem(problem: Problem, indices: Sequence[int]) -> Problem:
    data = problem.model_dump()
    data["pointer"] = remap_pointer(problem.pointer, indices)
    errs = data.get("errors")
    if isinstance(errs, list):
        data["errors"] = [
            {**e, "pointer": remap_pointer(e.get("pointer"), indices)} if isinstance(e, dict) else e for e in errs
        ]
    return Problem.model_validate(data)


def _remap_error(err: KawhiHTTPError, indices: Sequence[int]) -> KawhiHTTPError:
    err.problem = remap_problem(err.problem, indices)
    err.args = (err._message(),)
    return err


_TYPE_TAG = re.compile(r"^[a-z_-]+\[.*\]$")


def _loc_pointer(prefix: str, loc: Iterable[Any]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, str) and _TYPE_TAG.match(part):
            continue  # a union member's name, not a field of the document
        out += "/" + str(part).replace("~", "~0").replace("/", "~1")
    return out


def _validation_problem(exc: ValidationError, prefix: str) -> Problem:
    errors = exc.errors()
    listed = [
        {"pointer": _loc_pointer(prefix, e.get("loc", ())), "detail": str(e.get("msg", "")).removeprefix("Value error, ")}
        for e in errors
    ]
    first = listed[0] if listed else {"pointer": prefix, "detail": "invalid value"}
    detail = first["detail"]
    if len(listed) > 1:
        detail += f" (and {len(listed) - 1} more error(s), see 'errors')"
    return client_problem(detail, first["pointer"], errors=listed)


def options_json(options: OptionsLike = None, overrides: Optional[Mapping[str, Any]] = None) -> Optional[bytes]:
    """Options (model, dict and/or keyword overrides) -> their JSON, or None when empty.
    Raises InvalidRequest (pointer ``/options/<name>``) for an unknown or invalid option."""
    base: dict[str, Any] = {}
    if isinstance(options, Options):
        base = options.model_dump(exclude_none=True)
    elif options is not None:
        base = dict(options)
    base.update({k: v for k, v in (overrides or {}).items()})
    base = {k: v for k, v in base.items() if v is not None}
    if not base:
        return None
    try:
        model = Options.model_validate(base)
    except ValidationError as exc:
        raise InvalidRequest(_validation_problem(exc, "/options"), attempts=0) from None
    return _dumps(model.model_dump(mode="python", exclude_none=True))


@dataclass
class _Group:
    """One group ready to send: its wire JSON (image by hash) and estimates."""

    index: int
    id: Optional[str]
    sha256: str
    json: bytes
    tokens: int


def prepare_groups(
    groups: Sequence[GroupLike], per_group_errors: bool
) -> tuple[list[Optional[_Group]], dict[int, GroupResult], dict[str, LoadedImage]]:
    """Validate every group and load its image.

    Returns (prepared groups, with None where a group failed; a GroupResult carrying the
    error of each failed group; the images by sha256). A failure raises InvalidRequest
    unless ``per_group_errors``.
    """
    prepared: list[Optional[_Group]] = []
    failed: dict[int, GroupResult] = {}
    images: dict[str, LoadedImage] = {}
    for i, g in enumerate(groups):
        prefix = f"/groups/{i}"
        raw: Any = None
        try:
            if isinstance(g, RolloutGroup):
                raw = g.model_dump(exclude_unset=True)
            elif isinstance(g, Mapping):
                raw = dict(g)
            else:
                raise InvalidRequest(
                    client_problem(f"a group must be a RolloutGroup or a dict, not {type(g).__name__}", prefix),
                    attempts=0,
                )
            if raw.get("image") is None:
                raise InvalidRequest(client_problem("the group has no image", prefix + "/image"), attempts=0)
            try:
                img = load_image(raw["image"])
            except ImageInputError as exc:
                ptr = prefix + "/image" + (f"/{exc.field}" if exc.field else "")
                raise InvalidRequest(client_problem(exc.detail, ptr), attempts=0) from exc
            raw["image"] = {"sha256": img.sha256}
            try:
                model = RolloutGroup.model_validate(raw)
            except ValidationError as exc:
                raise InvalidRequest(_validation_problem(exc, prefix), attempts=0) from None
            wire = model.model_dump(mode="python", exclude_unset=True)
            wire["image"] = {"sha256": img.sha256}
        except InvalidRequest as err:
            if not per_group_errors:
                raise
            gid = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None
            failed[i] = GroupResult(id=gid, error=err.problem)
            prepared.append(None)
            continue
        if img.sha256 not in images or images[img.sha256].data is None:
            images[img.sha256] = img
        prepared.append(_Group(i, model.id, img.sha256, _dumps(wire), estimate_tokens(wire)))
    return prepared, failed, images


def merge_responses(
    n: int,
    pieces: Sequence[tuple[Sequence[int], ReweightResponse]],
    failed: Mapping[int, GroupResult],
    info: Optional[Mapping[str, Any]],
) -> ReweightResponse:
    """One envelope, results in input order, from the sub-requests' answers (a later
    piece for the same position wins: it is a repeat after an eviction)."""
    results: list[Optional[GroupResult]] = [None] * n
    for i, r in failed.items():
        results[i] = r
    tokens, ms = 0, 0.0
    for indices, resp in pieces:
        for k, i in enumerate(indices):
            results[i] = resp.results[k]
        tokens += resp.usage.tokens
        ms += resp.usage.milliseconds
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise ProtocolError(f"no result for group(s) {missing[:10]}")
    if pieces:
        first = pieces[0][1]
        model, version, options = first.model, first.version, first.options
    else:
        info = info or {}
        model, version, options = str(info.get("model", "")), str(info.get("version", "")), {}
    return ReweightResponse(
        model=model, version=version, options=options, usage=Usage(tokens=tokens, milliseconds=round(ms, 3)),
        results=results,  # type: ignore[arg-type]
    )


def new_request_id() -> str:
    return uuid.uuid4().hex


# ============================================================================ actions


@dataclass
class _Call:
    """Send one HTTP request; the driver answers the httpx.Response (body read) or
    throws the httpx exception into the job."""

    method: str
    path: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    content: Optional[bytes] = None


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Parallel:
    """Run these jobs concurrently, each holding one of the ``max_in_flight`` slots for
    its whole life (retries and waits included); answers their results in order. Inside
    a job (already holding a slot) the jobs run one after another in that slot."""

    jobs: list[Generator[Any, Any, Any]]


Job = Generator[Any, Any, Any]

# httpx errors worth another attempt: the network, a dropped connection, a timeout.
_RETRY_EXC = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


# ============================================================================ the shared logic


class _Core:
    """Everything the two clients share: configuration, caches, counters, and the
    operations as generator jobs (see the module doc)."""

    def __init__(
        self,
        base_url: Optional[str],
        api_key: Optional[str],
        *,
        timeout: float,
        timeout_per_token: float,
        connect_timeout: float,
        max_in_flight: int,
        retries: Union[int, RetryPolicy, None],
        backoff: float,
        wait_ready: Union[bool, float],
        max_groups_per_request: Optional[int],
        headers: Optional[Mapping[str, str]],
        rng: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.base_url = (base_url or os.environ.get("KAWHI_URL") or DEFAULT_URL).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        key = api_key if api_key is not None else os.environ.get("KAWHI_API_KEY")
        self.timeouts = Timeouts(base=timeout, per_token=timeout_per_token, connect=connect_timeout)
        self.max_in_flight = max_in_flight
        if isinstance(retries, RetryPolicy):
            self.retry = retries
        else:
            self.retry = RetryPolicy(max_attempts=1 + max(0, int(retries or 0)), backoff=backoff)
        if wait_ready is True:
            self.ready_timeout: Optional[float] = DEFAULT_READY_TIMEOUT_S
        elif wait_ready is False or wait_ready is None:
            self.ready_timeout = None
        else:
            self.ready_timeout = float(wait_ready)
        self.ready = self.ready_timeout is None
        self.max_groups_per_request = max_groups_per_request
        self.headers = {
            "User-Agent": USER_AGENT,
            "Accept": "application/json, application/problem+json",
            **(dict(headers) if headers else {}),
        }
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.wallclock = wallclock
        self.stats = ClientStats()
        self.info: Optional[dict[str, Any]] = None
        self.limits: Optional[Limits] = None
        self._known: dict[str, None] = {}  # sha256 of images the server was sent (insertion-ordered)
        self._known_max = 100_000
        self.wire = b""  # see wire_fields
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
        call = _Call(method, path, headers, timeout, content)
        start = self.clock()
        attempt = 0
        while True:
            attempt += 1
            self.stats.add(http_requests=1)
            retry_after: Optional[float] = None
            failure: Any
            try:
                resp = yield call
            except _RETRY_EXC as exc:
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
            yield _Sleep(wait)

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
                resp = yield _Call("GET", "/readyz", {"X-Request-ID": new_request_id()}, probe_timeout)
            except _RETRY_EXC as exc:  # not up yet: wait it out
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
            yield _Sleep(max(0.0, min(wait, 5.0, remaining)))

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
            yield _Parallel([self.upload_job(img) for img in uploads])

        todo = [g for g in prepared if g is not None]
        runs = plan_chunks(
            [(len(g.json), g.tokens) for g in todo],
            max_groups=limits.groups_per_request(self.max_in_flight, self.max_groups_per_request),
            max_bytes=max(1024, limits.max_body_bytes - 1024),
            max_tokens=limits.max_request_tokens,
            overhead=body_overhead(opts, per_group_errors, self.wire),
        )
        prefix = request_id or new_request_id()
        jobs = []
        for k, run in enumerate(runs):
            rid = prefix if len(runs) == 1 else f"{prefix}.{k}"
            jobs.append(self.chunk_job([todo[p] for p in run], opts, per_group_errors, images, rid, set()))
        answers = (yield _Parallel(jobs)) if jobs else []
        pieces = [piece for answer in answers for piece in answer]
        return merge_responses(len(groups), pieces, failed, info)

    def chunk_job(
        self,
        chunk: list[_Group],
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
            body = build_body([g.json for g in chunk], opts, per_group_errors, self.wire)
            timeout = self.timeouts.for_tokens(sum(g.tokens for g in chunk))
            try:
                resp = yield from self.exchange(
                    "POST", "/v1/reweight", timeout=timeout, content=body, content_type="application/json",
                    request_id=request_id,
                )
            except ImageNotFound as err:
                sha = err.sha256 or _sha_at(err.pointer, chunk)
                if sha and reuploadable(sha):
                    yield from reupload(sha)
                    continue
                raise _remap_error(err, indices)
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
                raise _remap_error(err, indices)
            except KawhiHTTPError as err:
                raise _remap_error(err, indices)
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


def _sha_at(ptr: Optional[str], chunk: Sequence[_Group]) -> Optional[str]:
    m = _GROUP_POINTER.match(ptr or "")
    if m and int(m.group(1)) < len(chunk):
        return chunk[int(m.group(1))].sha256
    return None


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content) if content else None
    except (ValueError, UnicodeDecodeError):
        return None


def _describe(failure: Any) -> str:
    if isinstance(failure, httpx.Response):
        return f"HTTP {failure.status_code}"
    return type(failure).__name__


def _resume(job: Job, value: Any, error: Optional[BaseException]) -> tuple[bool, Any]:
    """Advance a job: (True, its return value) when it is done, else (False, next action)."""
    try:
        action = job.throw(error) if error is not None else job.send(value)
    except StopIteration as stop:
        return True, stop.value
    return False, action


def _check_action(action: Any) -> None:
    if not isinstance(action, (_Call, _Sleep, _Parallel)):
        raise TypeError(f"kawhi_client: a job yielded {action!r}")


# ============================================================================ public clients


_SIGNATURE_DOC = """
    Args:
        base_url: the service, e.g. ``http://kawhi:8000`` (default: ``$KAWHI_URL`` or
            ``http://127.0.0.1:8000``).
        api_key: bearer key (default: ``$KAWHI_API_KEY``; none = no auth header).
        timeout: base seconds of every timeout; the read timeout of a request is
            ``timeout + timeout_per_token * estimated tokens`` (grows with the work sent).
        timeout_per_token: seconds of read timeout added per estimated token.
        connect_timeout: seconds to make a connection.
        max_in_flight: requests in flight at once, retries included (per client).
        retries: retries of a transient failure (int), or a full ``RetryPolicy``.
        backoff: base seconds of the exponential backoff (when ``retries`` is an int).
        wait_ready: before the first call wait for ``/readyz``: True (up to 600 s), a
            number of seconds, or False (do not wait).
        max_groups_per_request: cap the groups per request below the server's limit.
        headers: extra HTTP headers on every request.
        encoding_format: ``"float"`` (JSON numbers) or ``"base64"`` (per-token arrays as
            little-endian float32, ~4x fewer bytes; decoded to lists transparently).
        token_arrays: False asks for no per-token arrays (``token_advantages`` and
            ``token_weights`` are None; the paragraphs carry spans and weights).
        verify: TLS verification, as httpx takes it.
"""


class _Base:
    _core: _Core

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def stats(self) -> ClientStats:
        """Counters: HTTP attempts, retries, uploads, re-uploads, requests, groups."""
        return self._core.stats

    @property
    def limits(self) -> Optional[Limits]:
        """The limits read from ``/v1/info`` (None before the first call)."""
        return self._core.limits

    @property
    def retry_policy(self) -> RetryPolicy:
        return self._core.retry

    @property
    def timeouts(self) -> Timeouts:
        return self._core.timeouts

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._core.base_url!r}, max_in_flight={self._core.max_in_flight})"



def _core_args(
    base_url: Optional[str],
    api_key: Optional[str],
    timeout: float,
    timeout_per_token: float,
    connect_timeout: float,
    max_in_flight: int,
    retries: Union[int, RetryPolicy, None],
    backoff: float,
    wait_ready: Union[bool, float],
    max_groups_per_request: Optional[int],
    headers: Optional[Mapping[str, str]],
) -> dict[str, Any]:
    return dict(
        base_url=base_url, api_key=api_key, timeout=timeout, timeout_per_token=timeout_per_token,
        connect_timeout=connect_timeout, max_in_flight=max_in_flight, retries=retries, backoff=backoff,
        wait_ready=wait_ready, max_groups_per_request=max_groups_per_request, headers=headers,
    )


def _http_limits(max_in_flight: int) -> httpx.Limits:
    return httpx.Limits(max_connections=max_in_flight + 2, max_keepalive_connections=max_in_flight + 2)


class Client(_Base):
    """Synchronous client of the KAWHI service (thread-safe; a context manager).

    ``reweight(groups, **options)`` -> ``list[GroupResult]`` in input order.
    """

    __doc__ = (__doc__ or "") + _SIGNATURE_DOC

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 60.0,
        timeout_per_token: float = 0.002,
        connect_timeout: float = 10.0,
        max_in_flight: int = 4,
        retries: Union[int, RetryPolicy, None] = 5,
        backoff: float = 0.5,
        wait_ready: Union[bool, float] = True,
        max_groups_per_request: Optional[int] = None,
        headers: Optional[Mapping[str, str]] = None,
        encoding_format: str = "float",
        token_arrays: bool = True,
        verify: Any = True,
    ) -> None:
        self._core = _Core(**_core_args(
            base_url, api_key, timeout, timeout_per_token, connect_timeout, max_in_flight, retries, backoff,
            wait_ready, max_groups_per_request, headers,
        ))
        self._core.wire = wire_fields(encoding_format, token_arrays)
        self._http = httpx.Client(
            base_url=self._core.base_url, headers=self._core.headers, limits=_http_limits(max_in_flight),
            verify=verify, follow_redirects=False,
        )
        self._slots = threading.BoundedSemaphore(max_in_flight)

    # ------------------------------------------------------------------ API
    def reweight(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: Optional[str] = None,
        **option_kwargs: Any,
    ) -> list[GroupResult]:
        """Reweight rollout groups; one ``GroupResult`` per group, in input order.

        ``groups``: ``RolloutGroup`` models or dicts of the wire shape; ``image`` may be
        bytes, a local path, ``{"data": base64}``, ``{"path": ...}`` or ``{"sha256": ...}``.
        Options as ``options=`` (``Options`` or dict) and/or keywords (``temperature=0.2``).
        ``per_group_errors=True``: a bad group gets ``GroupResult.error`` instead of
        failing the call. ``request_id``: the X-Request-ID (``<id>.<k>`` when split).
        """
        return self.reweight_response(
            groups, options=options, per_group_errors=per_group_errors, request_id=request_id, **option_kwargs
        ).results

    def reweight_response(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: Optional[str] = None,
        **option_kwargs: Any,
    ) -> ReweightResponse:
        """Like ``reweight`` but the whole envelope (model, version, resolved options,
        usage summed over the requests the batch was split into)."""
        return self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    def upload_image(self, image: Any) -> str:
        """Upload image bytes (or a path / base64 dict) unchanged; returns its sha256."""
        return self._drive(self._core.upload_image_job(image))

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``GET /v1/info`` (cached after the first call): model, limits, defaults ..."""
        return self._drive(self._core.info_job(refresh))

    def wait_ready(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """Block until ``/readyz`` says ready; raises ServerNotReady after ``timeout`` s."""
        return self._drive(self._core.wait_ready_job(timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ driver
    def _drive(self, job: Job, in_slot: bool = False) -> Any:
        value: Any = None
        error: Optional[BaseException] = None
        while True:
            done, action = _resume(job, value, error)
            if done:
                return action
            _check_action(action)
            value, error = None, None
            try:
                if isinstance(action, _Call):
                    value = self._http.request(
                        action.method, action.path, content=action.content, headers=action.headers,
                        timeout=action.timeout,
                    )
                elif isinstance(action, _Sleep):
                    time.sleep(action.seconds)
                elif in_slot:  # already holding a slot: one after another in it
                    value = [self._drive(j, True) for j in action.jobs]
                elif len(action.jobs) == 1:
                    value = [self._in_slot(action.jobs[0])]
                else:
                    value = self._parallel(action.jobs)
            except Exception as exc:  # handed to the job, which decides
                error = exc

    def _in_slot(self, job: Job) -> Any:
        with self._slots:
            return self._drive(job, True)

    def _parallel(self, jobs: list[Job]) -> list[Any]:
        pool = ThreadPoolExecutor(max_workers=min(len(jobs), self._core.max_in_flight),
                                  thread_name_prefix="kawhi-client")
        try:
            futures = [pool.submit(self._in_slot, j) for j in jobs]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class AsyncClient(_Base):
    """Asynchronous client of the KAWHI service (an async context manager); the same
    methods as ``Client``, as coroutines."""

    __doc__ = (__doc__ or "") + _SIGNATURE_DOC

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 60.0,
        timeout_per_token: float = 0.002,
        connect_timeout: float = 10.0,
        max_in_flight: int = 4,
        retries: Union[int, RetryPolicy, None] = 5,
        backoff: float = 0.5,
        wait_ready: Union[bool, float] = True,
        max_groups_per_request: Optional[int] = None,
        headers: Optional[Mapping[str, str]] = None,
        encoding_format: str = "float",
        token_arrays: bool = True,
        verify: Any = True,
    ) -> None:
        self._core = _Core(**_core_args(
            base_url, api_key, timeout, timeout_per_token, connect_timeout, max_in_flight, retries, backoff,
            wait_ready, max_groups_per_request, headers,
        ))
        self._core.wire = wire_fields(encoding_format, token_arrays)
        self._http = httpx.AsyncClient(
            base_url=self._core.base_url, headers=self._core.headers, limits=_http_limits(max_in_flight),
            verify=verify, follow_redirects=False,
        )
        self._slots = asyncio.Semaphore(max_in_flight)

    # ------------------------------------------------------------------ API
    async def reweight(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: Optional[str] = None,
        **option_kwargs: Any,
    ) -> list[GroupResult]:
        """See ``Client.reweight``."""
        resp = await self.reweight_response(
            groups, options=options, per_group_errors=per_group_errors, request_id=request_id, **option_kwargs
        )
        return resp.results

    async def reweight_response(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: Optional[str] = None,
        **option_kwargs: Any,
    ) -> ReweightResponse:
        """See ``Client.reweight_response``."""
        return await self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    async def upload_image(self, image: Any) -> str:
        """See ``Client.upload_image``."""
        return await self._drive(self._core.upload_image_job(image))

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        """See ``Client.info``."""
        return await self._drive(self._core.info_job(refresh))

    async def wait_ready(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """See ``Client.wait_ready``."""
        return await self._drive(self._core.wait_ready_job(timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ driver
    async def _drive(self, job: Job, in_slot: bool = False) -> Any:
        value: Any = None
        error: Optional[BaseException] = None
        while True:
            done, action = _resume(job, value, error)
            if done:
                return action
            _check_action(action)
            value, error = None, None
            try:
                if isinstance(action, _Call):
                    value = await self._http.request(
                        action.method, action.path, content=action.content, headers=action.headers,
                        timeout=action.timeout,
                    )
                elif isinstance(action, _Sleep):
                    await asyncio.sleep(action.seconds)
                elif in_slot:
                    value = [await self._drive(j, True) for j in action.jobs]
                else:
                    value = await self._parallel(action.jobs)
            except Exception as exc:  # handed to the job, which decides
                error = exc

    async def _in_slot(self, job: Job) -> Any:
        async with self._slots:
            return await self._drive(job, True)

    async def _parallel(self, jobs: list[Job]) -> list[Any]:
        tasks = [asyncio.ensure_future(self._in_slot(j)) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
