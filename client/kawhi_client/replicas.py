"""Several replicas of the service: rendezvous hashing on the routing key, passive
health, and a headless-Service name re-resolved to its pod addresses. Pure, no I/O
(the client's jobs do the DNS lookups and the requests; see ``kawhi_client.core``).

**Ranking.** Every replica gets the score ``blake2b(key NUL replica)``; a key's
replicas in falling score order are its preference list (rendezvous or
highest-random-weight hashing). The first healthy one owns the key. When a replica
leaves, only the keys it owned move, each to its own next choice; when it comes back
it owns exactly those keys again. Nothing sticks to the replica a key failed over to.

**Health.** A replica that answered a connection error, a timeout, 503 or 429 is
marked down for a cooldown (its ``Retry-After``, else 1 s doubling per consecutive
failure up to 30 s) and skipped while down; any answer below 500 other than 429
marks it up again. When every replica is down, the key's first choice is tried anyway
(the request's retry policy then waits between attempts).

**Discovery.** ``dns+http://kawhi-headless.ml.svc:8000`` names a headless Service:
its A/AAAA records are the ready pods' addresses. They are looked up on first use and
again every ``resolve_every`` seconds (sooner while the set is empty); a failed
lookup keeps the last set. The identity of a replica in the hash is its URL, so a pod
keeps its keys as long as it keeps its address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

DNS_SCHEME_PREFIX = "dns+"
MIN_COOLDOWN_S = 1.0
MAX_COOLDOWN_S = 30.0
EMPTY_RELOOKUP_S = 1.0

ReplicasLike = str | Sequence[str]


def score(key: str, replica: str) -> int:
    """The rendezvous score of ``replica`` for ``key`` (64 bits)."""
    digest = hashlib.blake2b(f"{key}\0{replica}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(key: str, replicas: Iterable[str]) -> list[str]:
    """``replicas`` in the key's order of preference (highest score first)."""
    return sorted(replicas, key=lambda r: (score(key, r), r), reverse=True)


def _normalise_url(url: str, schemes: Sequence[str] = ("http", "https")) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(tuple(f"{s}://" for s in schemes)):
        raise ValueError(f"a replica URL must start with {' or '.join(f'{s}://' for s in schemes)}, got {url!r}")
    return url


def url_for_address(scheme: str, address: str, port: int) -> str:
    """``http://10.1.2.3:8000`` or ``http://[fd00::1]:8000``."""
    host = f"[{address}]" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else address
    return f"{scheme}://{host}:{port}"


@dataclass(frozen=True)
class DnsTarget:
    """A headless Service: the scheme and port of its pods, and the name to resolve."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str, schemes: Sequence[str] = ("http", "https")) -> DnsTarget:
        parts = urlsplit(spec[len(DNS_SCHEME_PREFIX):])
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"expected dns+{schemes[0]}://NAME:PORT, got {spec!r}")
        return cls(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


@dataclass
class _Health:
    down_until: float = 0.0
    failures: int = 0


class ReplicaSet:
    """The replicas a client spreads its groups over (thread-safe).

    ``spec``: a list of base URLs, a comma-separated string of them, or
    ``dns+http://NAME:PORT`` (a headless Service, re-resolved every ``resolve_every`` s).
    ``schemes``: the URL schemes a replica may have (the gRPC clients': ``grpc``).
    """

    def __init__(self, spec: ReplicasLike, *, resolve_every: float = 30.0,
                 schemes: Sequence[str] = ("http", "https")) -> None:
        self.dns: DnsTarget | None = None
        self.resolve_every = float(resolve_every)
        self._urls: tuple[str, ...] = ()
        self._health: dict[str, _Health] = {}
        self._next_lookup = 0.0
        self._lock = threading.Lock()
        if isinstance(spec, str) and spec.strip().startswith(DNS_SCHEME_PREFIX):
            self.dns = DnsTarget.parse(spec.strip(), schemes)
            self.description = spec.strip()
        else:
            items = spec.split(",") if isinstance(spec, str) else list(spec)
            urls = tuple(dict.fromkeys(_normalise_url(u, schemes) for u in items if u and u.strip()))
            if not urls:
                raise ValueError("replicas: give at least one URL")
            self._set(urls)
            self.description = ",".join(urls)

    # ------------------------------------------------------------------ membership
    @property
    def urls(self) -> tuple[str, ...]:
        with self._lock:
            return self._urls

    def _set(self, urls: tuple[str, ...]) -> None:
        self._urls = urls
        self._health = {u: self._health.get(u, _Health()) for u in urls}

    def lookup_due(self, now: float) -> bool:
        """True (once, until ``update``/``lookup_failed``) when the name should be resolved now."""
        if self.dns is None:
            return False
        with self._lock:
            if now < self._next_lookup:
                return False
            self._next_lookup = now + self.resolve_every  # claimed: concurrent jobs do not all look up
            return True

    def update(self, addresses: Sequence[str], now: float) -> tuple[set[str], set[str]]:
        """Take the addresses a lookup answered; returns the (joined, left) URLs."""
        assert self.dns is not None
        urls = tuple(sorted({url_for_address(self.dns.scheme, a, self.dns.port) for a in addresses}))
        with self._lock:
            before = set(self._urls)
            self._set(urls)
            self._next_lookup = now + (self.resolve_every if urls else EMPTY_RELOOKUP_S)
        return set(urls) - before, before - set(urls)

    def lookup_failed(self, now: float) -> None:
        with self._lock:  # keep the last set; try again soon if there is none
            self._next_lookup = now + (self.resolve_every if self._urls else EMPTY_RELOOKUP_S)

    # ------------------------------------------------------------------ choice
    def order(self, key: str, now: float) -> list[str]:
        """The key's replicas: the healthy ones by preference, then the down ones."""
        with self._lock:
            ranked = rank(key, self._urls)
            up = [u for u in ranked if self._health[u].down_until <= now]
        return up + [u for u in ranked if u not in up]

    def owner(self, key: str, now: float) -> str | None:
        order = self.order(key, now)
        return order[0] if order else None

    def is_up(self, url: str, now: float) -> bool:
        with self._lock:
            h = self._health.get(url)
            return h is not None and h.down_until <= now

    # ------------------------------------------------------------------ health
    def mark_down(self, url: str, now: float, retry_after: float | None = None) -> float:
        """Skip ``url`` for a cooldown; returns its length in seconds."""
        with self._lock:
            h = self._health.get(url)
            if h is None:
                return 0.0
            h.failures += 1
            cooldown = min(MAX_COOLDOWN_S, MIN_COOLDOWN_S * 2 ** (h.failures - 1))
            if retry_after is not None:
                cooldown = min(MAX_COOLDOWN_S, max(0.0, retry_after))
            h.down_until = max(h.down_until, now + cooldown)
            return cooldown

    def mark_up(self, url: str) -> None:
        with self._lock:
            h = self._health.get(url)
            if h is not None:
                h.down_until, h.failures = 0.0, 0

    def __repr__(self) -> str:
        return f"ReplicaSet({self.description!r}, {len(self.urls)} replica(s))"
