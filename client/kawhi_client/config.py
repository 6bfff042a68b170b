"""What a client is configured with: the retry policy, timeouts, the server's limits,
the counters, and ``ClientConfig`` (the settings both clients resolve their constructor
arguments into). Pure values, no I/O.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_READY_TIMEOUT_S = 600.0
# With the default wait_ready (True), a URL where nothing has answered yet (connection refused,
# no such host) is given up on after this long: a wrong URL or port fails in seconds, not in
# ten minutes. A server that answers "loading" is waited for the whole DEFAULT_READY_TIMEOUT_S;
# wait_ready=<seconds> asks to wait that long even for a server that does not listen yet.
UNREACHABLE_GRACE_S = 5.0
# While waiting for /readyz the client logs (warning) first after this long, then every READY_LOG_EVERY_S.
READY_LOG_FIRST_S = 5.0
READY_LOG_EVERY_S = 30.0
# With several replicas, an attempt that has not been answered after this many seconds (plus
# timeout_per_token per estimated token) goes to the next healthy replica: a hung replica
# (stopped, deadlocked, its TCP still accepting) costs a call this long, not the full read
# timeout on every retry. See Timeouts.for_failover and docs/client.md.
DEFAULT_FAILOVER_TIMEOUT_S = 20.0


def _client_version() -> str:
    try:
        from importlib.metadata import version

        return version("kawhi")
    except Exception:  # not installed as a distribution (a source checkout)
        return "0"


USER_AGENT = f"kawhi-client/{_client_version()} httpx/{httpx.__version__}"


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
        retry_after: float | None = None,
        elapsed: float = 0.0,
        rng: Any = random,
    ) -> float | None:
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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
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
        when = when.replace(tzinfo=datetime.timezone.utc)
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

    ``failover`` (several replicas only): the shorter wait of an attempt that another
    healthy replica could take over instead (see ``for_failover``).
    """

    base: float = 60.0
    per_token: float = 0.002
    connect: float = 10.0
    failover: float | None = DEFAULT_FAILOVER_TIMEOUT_S

    def read_timeout(self, tokens: int) -> float:
        return self.base + self.per_token * max(0, tokens)

    def for_tokens(self, tokens: int) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read_timeout(tokens), write=self.base, pool=self.base)

    def for_failover(self, tokens: int) -> httpx.Timeout | None:
        """The timeouts of an attempt that another replica could take over: it waits
        ``failover + per_token * tokens`` seconds (never more than ``for_tokens``) for
        the answer and for the replica to read the body; None when ``failover`` is None."""
        if self.failover is None:
            return None
        full = self.for_tokens(tokens)
        wait = min(self.failover + self.per_token * max(0, tokens), full.read or self.base)
        return httpx.Timeout(connect=self.connect, read=wait, write=min(wait, self.base), pool=self.base)


@dataclass(frozen=True)
class Limits:
    """What one request may hold, from ``GET /v1/info`` (``limits`` and ``server``)."""

    max_groups: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_request_tokens: int = 1_048_576
    queue_groups: int | None = None
    max_responses: int | None = None
    max_response_tokens: int | None = None
    max_group_tokens: int | None = None
    max_image_bytes: int | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> Limits:
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
            max_groups=pick("max_groups", default=d.max_groups),
            max_body_bytes=pick("max_body_bytes", default=d.max_body_bytes),
            max_request_tokens=pick("max_request_tokens", default=d.max_request_tokens),
            queue_groups=pick("queue_groups", src=srv) or pick("queue_groups"),
            max_responses=pick("max_responses"),
            max_response_tokens=pick("max_response_tokens"),
            max_group_tokens=pick("max_group_tokens"),
            max_image_bytes=pick("max_image_bytes"),
        )

    def groups_per_request(self, max_in_flight: int, cap: int | None = None) -> int:
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
    failovers: int = 0  # attempts sent to the next replica after one failed (several replicas)
    replica_timeouts: int = 0  # attempts a replica left unanswered past the failover timeout (hung?)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}



def resolve_base_url(base_url: str | None) -> str:
    """The service URL: the argument, else ``$KAWHI_URL``, else the local default."""
    url = (base_url or os.environ.get("KAWHI_URL") or DEFAULT_URL).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url


def request_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Headers of every request; the bearer key is the argument, else ``$KAWHI_API_KEY``
    (an empty key: no Authorization header)."""
    key = api_key if api_key is not None else os.environ.get("KAWHI_API_KEY")
    headers = {
        "User-Agent": USER_AGENT,
        "Accept": "application/json, application/problem+json",
        **(dict(extra) if extra else {}),
    }
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def retry_policy(retries: int | RetryPolicy | None, backoff: float) -> RetryPolicy:
    """A retry count (with a backoff base) or a full policy -> the policy."""
    if isinstance(retries, RetryPolicy):
        return retries
    return RetryPolicy(max_attempts=1 + max(0, int(retries or 0)), backoff=backoff)


def ready_timeout(wait_ready: bool | float | None) -> float | None:
    """``wait_ready`` -> seconds to wait for ``/readyz`` before the first call (None: do not wait)."""
    if wait_ready is True:
        return DEFAULT_READY_TIMEOUT_S
    if wait_ready is False or wait_ready is None:
        return None
    return float(wait_ready)


def unreachable_grace(wait_ready: bool | float | None) -> float | None:
    """``wait_ready`` -> seconds a URL that never answered is waited for (None: the whole wait).

    True (the default) gives up on nothing-listens after ``UNREACHABLE_GRACE_S``; a number is
    an explicit request to wait that long for a server that may not be listening yet."""
    return UNREACHABLE_GRACE_S if wait_ready is True else None


@dataclass(frozen=True)
class ClientConfig:
    """The resolved settings of one client (``Client`` documents the arguments they come from)."""

    base_url: str
    headers: Mapping[str, str]
    timeouts: Timeouts
    retry: RetryPolicy
    max_in_flight: int
    ready_timeout: float | None  # None: do not wait for /readyz
    unreachable_grace: float | None = None  # see unreachable_grace(); None: wait out refusals the whole time
    max_groups_per_request: int | None = None
    verify: Any = True
    replicas: Any = None  # None: one endpoint (base_url); else a ReplicaSet spec (kawhi_client.replicas)
    resolve_every: float = 30.0  # seconds between DNS lookups of a dns+http:// replica spec
    shared_image_cache: bool = False  # the replicas share one image store (Redis): upload an image once
    wire: bytes = b""  # request fields choosing the answer's array encoding (planning.wire_fields)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")

    def http_limits(self) -> httpx.Limits:
        return httpx.Limits(max_connections=self.max_in_flight + 2, max_keepalive_connections=self.max_in_flight + 2)
