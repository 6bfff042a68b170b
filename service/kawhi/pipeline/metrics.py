"""Prometheus metrics of the server, on a registry owned by the app (not the global one).

Names follow the Prometheus conventions (base units, ``_total`` for counters,
``_seconds`` for durations). Every app has its own ``CollectorRegistry`` so several
apps can live in one process (tests) without clashing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class _PrefixCacheCollector:
    """kawhi_prefix_cache_*: hits, misses, evictions, coalesced waits (counters), bytes, entries."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[Any]:
        s = self.cache.stats()
        for name, help_text in (("hits", "prefix lookups answered from the cache"),
                                ("misses", "prefixes computed"),
                                ("evictions", "prefixes evicted to stay within the byte budget"),
                                ("coalesced", "lookups that waited for the same prefix being computed")):
            yield CounterMetricFamily(f"kawhi_prefix_cache_{name}", help_text, value=s[name])
        yield GaugeMetricFamily("kawhi_prefix_cache_bytes", "bytes of prefixes held", value=s["bytes"])
        yield GaugeMetricFamily("kawhi_prefix_cache_entries", "prefixes held", value=s["entries"])
        yield GaugeMetricFamily("kawhi_prefix_cache_max_bytes", "byte budget of the prefix cache",
                                value=s["max_bytes"])


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests = Counter(
            "kawhi_requests",
            "requests answered, by front end (http | grpc), route template (gRPC: /package.Service/Method) and "
            "status (gRPC: the code's name)",
            ["frontend", "route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "kawhi_request_duration_seconds",
            "request latency, by front end, route template and status",
            ["frontend", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("kawhi_requests_in_flight", "requests being answered (HTTP and gRPC)", registry=r)
        self.queue_depth = Gauge(
            "kawhi_queue_depth", "rollout groups admitted and not yet in a forward (preparing or queued)", registry=r
        )
        self.batch_groups = Histogram(
            "kawhi_batch_groups", "rollout groups per batched forward", buckets=GROUP_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "kawhi_batch_tokens", "tokens per batched forward", buckets=TOKEN_BUCKETS, registry=r
        )
        self.forward_seconds = Histogram(
            "kawhi_forward_seconds", "wall time of one batched reference forward", buckets=FORWARD_BUCKETS, registry=r
        )
        self.prepare_seconds = Histogram(
            "kawhi_prepare_seconds", "wall time to decode, validate and tokenize one group", buckets=FORWARD_BUCKETS,
            registry=r,
        )
        self.groups = Counter("kawhi_groups", "rollout groups reweighted", registry=r)
        self.queue_dropped = Counter(
            "kawhi_queue_dropped", "admitted groups dropped before their forward, by reason "
            "(client-closed, timeout, error)", ["reason"], registry=r,
        )
        self.cache_hits = Counter("kawhi_cache_hits", "cache hits, by kind", ["kind"], registry=r)
        self.cache_misses = Counter("kawhi_cache_misses", "cache misses, by kind", ["kind"], registry=r)
        self.redis_degraded = Gauge(
            "kawhi_redis_degraded", "1 while Redis is configured but unreachable (serving from memory)", registry=r
        )
        self.redis_errors = Counter("kawhi_redis_errors", "failed Redis calls", registry=r)
        self.errors = Counter("kawhi_errors", "problem responses, by problem type", ["type"], registry=r)
        self.engine_ready = Gauge("kawhi_engine_ready", "1 once the reference model is loaded", registry=r)
        self.routing_requests = Counter(
            "kawhi_routing_requests", "reweight requests by whether their routing key was seen here before "
            "(seen, new, none)", ["key"], registry=r,
        )
        for seen in ("seen", "new", "none"):
            self.routing_requests.labels(seen)
        from kawhi.pipeline.affinity import SeenKeys

        self.routing_keys = SeenKeys()
        self.info = Gauge("kawhi_build_info", "constant 1, labelled with version and model", ["version", "model"],
                          registry=r)
        for kind in ("image", "result", "region"):
            self.cache_hits.labels(kind)
            self.cache_misses.labels(kind)

    def watch_prefix_cache(self, cache: Any) -> None:
        """Export a kawhi.models.prefix.PrefixCache's counters (read at each scrape)."""
        if getattr(self, "_prefix_collector", None) is None:
            self._prefix_collector = _PrefixCacheCollector(cache)
            self.registry.register(self._prefix_collector)
        self._prefix_collector.cache = cache

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_routing_key(self, raw: str | None) -> str:
        """Count one reweight's routing key (HTTP header or gRPC metadata): seen, new or none."""
        kind = self.routing_keys.observe(raw)
        self.routing_requests.labels(kind).inc()
        return kind
