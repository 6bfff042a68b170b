"""Caches by content hash: image bytes, region selections, stored responses.

Two tiers. An in-process LRU (bounded in bytes, per kind) always serves and is
written through; Redis (``KAWHI_REDIS_URL``), when configured, is the shared tier
that survives restarts and is shared between replicas.

Degradation: any Redis error marks the cache *degraded* (``/readyz`` says so with the
reason, ``kawhi_redis_degraded`` = 1, ``kawhi_redis_errors_total`` counts). While
degraded nothing waits on Redis; the LRU answers alone, and a background probe pings
Redis every ``redis_retry_s`` and clears the state when it answers again.

All methods here are synchronous and thread-safe; they are called from worker threads
(the engine's region cache) or via ``asyncio.to_thread`` from handlers, so a slow
Redis never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from kawhi.pipeline.metrics import Metrics

log = logging.getLogger("kawhi.pipeline.cache")

KINDS = ("image", "result", "region")


class LRU:
    """A thread-safe LRU bounded by the total size of its values (bytes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def set(self, key: str, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._size -= old[1]
            self._data[key] = (value, size)
            self._size += size
            while self._size > self.max_bytes and self._data:
                _, (_, s) = self._data.popitem(last=False)
                self._size -= s

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size(self) -> int:
        return self._size


class Caches:
    """The three content-addressed caches over one (optional) Redis connection."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        redis_url: str | None = None,
        redis_timeout_s: float = 0.5,
        redis_retry_s: float = 2.0,
        max_bytes: dict[str, int] | None = None,
        ttl_s: dict[str, int] | None = None,
        namespace: str = "kawhi:v1",
    ) -> None:
        self.metrics = metrics
        sizes = {"image": 512 << 20, "result": 128 << 20, "region": 32 << 20}
        sizes.update(max_bytes or {})
        self.lru = {kind: LRU(sizes[kind]) for kind in KINDS}
        self.ttl = {"image": 86400, "result": 3600, "region": 86400}
        self.ttl.update(ttl_s or {})
        self.namespace = namespace
        self.retry_s = redis_retry_s
        self.redis_url = redis_url
        self._redis = None
        self._degraded: str | None = None
        self._lock = threading.Lock()
        self._probe_task: asyncio.Task | None = None
        if redis_url:
            import redis  # the server extra installs it

            self._redis = redis.Redis.from_url(
                redis_url,
                socket_timeout=redis_timeout_s,
                socket_connect_timeout=redis_timeout_s,
                retry_on_timeout=False,
                health_check_interval=0,
            )

    # ------------------------------------------------------------------ state
    @property
    def uses_redis(self) -> bool:
        return self._redis is not None

    @property
    def degraded(self) -> str | None:
        """None when healthy (or no Redis configured), else why Redis is not used."""
        return self._degraded

    def _mark_degraded(self, exc: BaseException) -> None:
        self.metrics.redis_errors.inc()
        reason = f"redis unreachable: {type(exc).__name__}: {exc}"[:300]
        with self._lock:
            was = self._degraded
            self._degraded = reason
        self.metrics.redis_degraded.set(1)
        if was is None:
            log.warning("redis degraded; serving from the in-process cache", extra={"reason": reason})

    def _mark_healthy(self) -> None:
        with self._lock:
            was = self._degraded
            self._degraded = None
        self.metrics.redis_degraded.set(0)
        if was is not None:
            log.info("redis recovered")

    def _key(self, kind: str, key: str) -> str:
        return f"{self.namespace}:{kind}:{key}"

    # ------------------------------------------------------------------ sync API
    def get(self, kind: str, key: str) -> bytes | None:
        value = self.lru[kind].get(key)
        if value is not None:
            self.metrics.cache_hits.labels(kind).inc()
            return value
        if self._redis is not None and self._degraded is None:
            try:
                value = self._redis.get(self._key(kind, key))
            except Exception as exc:  # redis.RedisError, OSError ...
                self._mark_degraded(exc)
                value = None
            if value is not None:
                self.lru[kind].set(key, value, len(value))
                self.metrics.cache_hits.labels(kind).inc()
                return value
        self.metrics.cache_misses.labels(kind).inc()
        return None

    def set(self, kind: str, key: str, value: bytes) -> None:
        self.lru[kind].set(key, value, len(value))
        if self._redis is not None and self._degraded is None:
            try:
                self._redis.set(self._key(kind, key), value, ex=self.ttl[kind])
            except Exception as exc:
                self._mark_degraded(exc)

    def contains(self, kind: str, key: str) -> bool:
        return self.get(kind, key) is not None

    # ------------------------------------------------------------------ async API
    async def aget(self, kind: str, key: str) -> bytes | None:
        value = self.lru[kind].get(key)  # fast path without a thread hop
        if value is not None:
            self.metrics.cache_hits.labels(kind).inc()
            return value
        if self._redis is None or self._degraded is not None:
            self.metrics.cache_misses.labels(kind).inc()
            return None
        return await asyncio.to_thread(self.get, kind, key)

    async def aset(self, kind: str, key: str, value: bytes) -> None:
        if self._redis is None or self._degraded is not None:
            self.lru[kind].set(key, value, len(value))
            return
        await asyncio.to_thread(self.set, kind, key, value)

    # ------------------------------------------------------------------ regions
    def region_cache(self) -> RegionCache:
        return RegionCache(self)

    # ------------------------------------------------------------------ lifecycle
    def ping(self) -> bool:
        if self._redis is None:
            return True
        try:
            self._redis.ping()
        except Exception as exc:
            self._mark_degraded(exc)
            return False
        self._mark_healthy()
        return True

    async def start(self) -> None:
        if self._redis is None:
            return
        await asyncio.to_thread(self.ping)
        self._probe_task = asyncio.create_task(self._probe(), name="kawhi-redis-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            if self._degraded is not None:
                await asyncio.to_thread(self.ping)

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            try:
                await self._probe_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:
                pass


class RegionCache:
    """The engine's region cache protocol (.get(key) -> dict | None, .set(key, dict)) over Caches.

    Values are stored as JSON; a value that is not JSON-serialisable is kept in the
    in-process tier only.
    """

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def get(self, key: str) -> dict | None:
        raw = self.caches.get("region", key)
        if raw is None:
            return None
        if isinstance(raw, (bytes, bytearray)):
            try:
                raw = json.loads(raw)
            except ValueError:
                return None
        return raw if isinstance(raw, dict) else None  # anything else is a corrupt entry: recompute

    def set(self, key: str, value: dict) -> None:
        try:
            raw = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError):
            self.caches.lru["region"].set(key, value, 4096)
            return
        self.caches.set("region", key, raw)
