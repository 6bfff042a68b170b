"""The jobs that spread requests over several replicas (a mixin of ``Core``): looking
a headless Service up again, choosing the replica of each attempt, failing over, and
grouping a batch by owner. The ranking and health themselves are pure
(``kawhi_client.replicas``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from kawhi_client.actions import Job, Lookup
from kawhi_client.config import RetryPolicy, Timeouts
from kawhi_client.planning import PreparedGroup
from kawhi_client.replicas import MAX_COOLDOWN_S, ReplicaSet

log = logging.getLogger("kawhi_client")


class ReplicaTimeout(httpx.TimeoutException):
    """An attempt that another healthy replica could have taken was not answered (or its
    body not read) within the failover timeout: the replica is hung or far behind."""

    def __init__(self, cause: httpx.TimeoutException, timeout: httpx.Timeout) -> None:
        self.seconds = float(timeout.read or 0.0)
        super().__init__(f"{type(cause).__name__} after {self.seconds:.1f}s", request=getattr(cause, "_request", None))


# The failures that send the next attempt to another replica: the replica is not answering.
# A timeout of the full read timeout is not one of them (the replica may still be working on
# it, and a retry there joins that work through the server's idempotency key); one of the
# shorter failover timeout is (ReplicaTimeout): a stopped process with its TCP still
# accepting answers nothing else.
FAILOVER_EXCEPTIONS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout, ReplicaTimeout)
FAILOVER_STATUSES = frozenset({429, 503})
# The timeouts that, on an attempt with the failover timeout, mean "this replica is hung".
HUNG_EXCEPTIONS = (httpx.ReadTimeout, httpx.WriteTimeout)
# How long a replica that left an attempt unanswered is skipped (then one call tries it again).
HUNG_COOLDOWN_S = MAX_COOLDOWN_S


class ReplicaJobs:
    """Mixed into ``Core``, which provides these attributes."""

    replicas: ReplicaSet | None
    retry: RetryPolicy
    timeouts: Timeouts
    clock: Callable[[], float]

    def refresh_replicas(self) -> Job:
        """Resolve a headless Service's name again when it is due (no-op otherwise)."""
        rs = self.replicas
        if rs is None or rs.dns is None or not rs.lookup_due(self.clock()):
            return
        try:
            addresses = yield Lookup(rs.dns.host, rs.dns.port)
        except OSError as exc:
            rs.lookup_failed(self.clock())
            log.warning("kawhi: could not resolve %s (%s); keeping %d replica(s)", rs.dns.host, exc, len(rs.urls))
            return
        joined, left = rs.update(list(addresses), self.clock())
        if joined or left:
            log.info("kawhi: replicas of %s: %d (+%d -%d)", rs.dns.host, len(rs.urls), len(joined), len(left))

    def choose_replica(self, key: str, avoid: set[str]) -> Job:
        """The replica for this attempt: the key's first healthy choice not failed in
        this exchange, else its first choice not failed, else its first; None if none."""
        yield from self.refresh_replicas()
        assert self.replicas is not None
        now = self.clock()
        order = self.replicas.order(key, now)
        for u in order:
            if u not in avoid and self.replicas.is_up(u, now):
                return u
        return next((u for u in order if u not in avoid), order[0] if order else None)

    def attempt_timeout(
        self, endpoint: str | None, failed: set[str], attempt: int, tokens: int
    ) -> httpx.Timeout | None:
        """The failover timeout (``Timeouts.for_failover``) when another healthy replica
        could take this attempt over if ``endpoint`` does not answer in time; else None
        (the attempt gets the full timeout: nowhere better to go)."""
        if self.replicas is None or endpoint is None or attempt >= self.retry.max_attempts:
            return None
        now = self.clock()
        if not any(u != endpoint and u not in failed and self.replicas.is_up(u, now) for u in self.replicas.urls):
            return None
        return self.timeouts.for_failover(tokens)

    def _fail_over(
        self, failure: Any, endpoint: str, retry_after: float | None, failed: set[str], attempt: int
    ) -> bool:
        """Mark a replica that did not serve the attempt down; True when another healthy
        replica can take the next attempt at once (no backoff wait)."""
        assert self.replicas is not None
        status = None if isinstance(failure, BaseException) else failure.status_code  # an answer, or an exception
        if not (isinstance(failure, FAILOVER_EXCEPTIONS) or status in FAILOVER_STATUSES):
            return False
        now = self.clock()
        if isinstance(failure, ReplicaTimeout):
            retry_after = HUNG_COOLDOWN_S
        self.replicas.mark_down(endpoint, now, retry_after)
        failed.add(endpoint)
        if attempt >= self.retry.max_attempts:
            return False
        return any(u not in failed and self.replicas.is_up(u, now) for u in self.replicas.urls)

    def owners(self, groups: list[PreparedGroup]) -> Job:
        """The groups by the replica that owns their routing key (in input order within
        each); with one endpoint, all of them under None."""
        if self.replicas is None:
            return {None: groups}
        yield from self.refresh_replicas()
        now = self.clock()
        out: dict[str | None, list[PreparedGroup]] = {}
        for g in groups:
            out.setdefault(self.replicas.owner(g.route, now), []).append(g)
        return out
