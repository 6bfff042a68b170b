"""Server state: everything the routes share, one per app, in a module of its own.

``app`` (factory, lifespan) and ``routes`` both import this module and never each
other. Routes reach the state through the ``get_state`` dependency.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request

from kawhi import __version__
from kawhi.errors import KawhiError
from kawhi.server.batcher import Batcher
from kawhi.server.cache import Caches
from kawhi.server.metrics import Metrics

log = logging.getLogger("kawhi.server")


def engine_limits(settings: Any) -> Any:
    """The engine's limits (kawhi.engine.engine.EngineLimits) that the settings describe."""
    from kawhi.engine.engine import EngineLimits
    from kawhi.engine.images import ImageLimits

    s = settings
    image = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, min_side=s.min_image_side)
    return EngineLimits(
        max_responses=s.max_responses_per_group,
        max_response_tokens=s.max_tokens_per_response,
        max_group_tokens=s.batch_tokens,
        max_forward_tokens=s.batch_tokens,
        split_attention=s.split_attention,
        prefix_cache_bytes=s.cache_prefix_bytes,
        image=image,
    )


def load_engine(settings: Any) -> Any:
    """The engine the settings describe (model, device, dtype, limits, method defaults).

    Imports torch and loads weights: call it off the event loop.
    """
    from kawhi.engine.engine import Engine

    s = settings
    threads = s.resolved_torch_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    return Engine.load(
        s.model, device=s.device, dtype=s.dtype, defaults=s.method_config(), limits=engine_limits(s),
        heads_file=s.heads_file,
    )


class ServerState:
    """Everything the routes share. One per app."""

    def __init__(self, settings: Any, engine: Any = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.api_keys = settings.api_key_list()
        self.caches = Caches(
            self.metrics,
            redis_url=settings.redis_url,
            redis_timeout_s=settings.redis_timeout_s,
            redis_retry_s=settings.redis_retry_s,
            max_bytes={
                "image": settings.cache_image_bytes,
                "result": settings.cache_result_bytes,
                "region": settings.cache_region_bytes,
            },
            ttl_s={"image": settings.image_ttl_s, "result": settings.result_ttl_s, "region": settings.region_ttl_s},
        )
        self.region_cache = self.caches.region_cache()
        self.engine: Any = None
        self.batcher: Batcher | None = None
        self.phase = "loading"  # loading | ready | failed | draining | stopped
        self.load_error: str | None = None
        # kawhi serve sets this: a model that cannot load ends the process (exit 1, one line) so a
        # pod crash-loops with a readable reason; an app built in-process keeps answering /readyz.
        self.on_load_failure: Any = None
        self.draining = False
        self.prepare_pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="kawhi-prepare")
        self.inflight: dict[str, asyncio.Future] = {}  # idempotency key -> response bytes being computed
        self.active = 0  # /v1 requests being served (what a drain waits for)
        self._active_lock = threading.Lock()
        self._given_engine = engine
        self.started_at = time.time()
        self.image_limits: Any = None
        self._pipeline: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the lifespan
        self.drain_expired = asyncio.Event()  # set when the drain deadline is near: in-flight work answers 503
        self.drain_deadline: float | None = None  # time.monotonic() by which the process is gone

    # ------------------------------------------------------------------ engine
    def build_limits(self) -> None:
        from kawhi.engine.images import ImageLimits  # light (PIL): /v1/images works while the model loads

        s = self.settings
        self.image_limits = ImageLimits(
            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, min_side=s.min_image_side
        )

    def load_engine(self) -> Any:
        return load_engine(self.settings)

    def engine_ready(self, engine: Any) -> None:
        s = self.settings
        self.engine = engine
        self.batcher = Batcher(
            engine,
            self.metrics,
            batch_tokens=s.batch_tokens,
            max_wait_s=s.batch_wait_ms / 1000.0,
            capacity=s.queue_groups,
            thread_init=self._init_forward_thread,
        )
        self.batcher.start()
        if not self.draining:
            self.phase = "ready"
        self.metrics.engine_ready.set(1)
        if getattr(engine, "prefix_cache", None) is not None:
            self.metrics.watch_prefix_cache(engine.prefix_cache)
        self.metrics.info.labels(__version__, engine.model_name).set(1)
        log.info("engine ready", extra={"model": engine.model_name, "is_demo": engine.is_demo})

    def _init_forward_thread(self) -> None:
        n = self.settings.resolved_torch_threads()
        if n:
            import torch

            torch.set_num_threads(n)

    def require_engine(self) -> Any:
        """The engine, or the 503 (with Retry-After) that says why there is none yet."""
        if self.draining:
            raise KawhiError("draining", "the server is shutting down; retry on another replica",
                             headers={"Retry-After": "5"})
        if self.engine is None:
            if self.phase == "failed":
                raise KawhiError("unavailable", "the model failed to load; see the server log",
                                 headers={"Retry-After": "30"})
            raise KawhiError("loading", "the reference model is loading", headers={"Retry-After": "2"})
        return self.engine

    def pipeline(self) -> Any:
        """The request pipeline over the engine, with the server's limits and region cache."""
        from kawhi.pipeline import Limits, Pipeline

        engine = self.require_engine()
        if self._pipeline is None or self._pipeline.engine is not engine:
            s = self.settings
            limits = Limits(max_groups=s.max_groups, max_responses=s.max_responses_per_group,
                            max_response_tokens=s.max_tokens_per_response,
                            max_group_tokens=min(s.batch_tokens, engine.model.max_positions),
                            max_request_tokens=s.max_request_tokens, image=self.image_limits)
            self._pipeline = Pipeline(engine, limits, region_cache=self.region_cache)
        return self._pipeline

    # ------------------------------------------------------------------ drain
    def begin_drain(self) -> None:
        """Refuse new work from now on; the drain deadline (drain_timeout_s) starts here."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        if not self.draining:
            self.draining = True
            self.phase = "draining"
            log.info("draining: refusing new work, finishing in-flight requests", extra={"in_flight": self.active})

    def drain_left(self) -> float:
        """Seconds left until the drain deadline (the full drain timeout before a drain)."""
        if self.drain_deadline is None:
            return float(self.settings.drain_timeout_s)
        return max(0.0, self.drain_deadline - time.monotonic())

    def expire_drain(self) -> None:
        """Thread-safe: every request still in flight answers 503 + Retry-After now."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.drain_expired.set)

    def enter(self) -> None:
        with self._active_lock:
            self.active += 1

    def leave(self) -> None:
        with self._active_lock:
            self.active -= 1

    def idle(self) -> bool:
        return self.active == 0 and (self.batcher is None or not self.batcher.busy)

    # ------------------------------------------------------------------ errors
    def count_error(self, err: KawhiError) -> None:
        self.metrics.errors.labels(err.slug).inc()

    def readiness(self) -> tuple[str, list[str]]:
        reasons: list[str] = []
        if self.phase == "ready":
            if self.caches.degraded:  # the reason (host, port, exception) is in the log, not here
                return "degraded", ["redis is unreachable; serving from the in-process cache"]
            return "ready", reasons
        if self.phase == "failed":
            reasons.append(f"the model failed to load: {self.load_error}" if self.load_error
                           else "the model failed to load; see the server log")
        if self.phase == "loading":
            reasons.append("the reference model is loading")
        if self.phase == "draining":
            reasons.append("shutting down; in-flight work is finishing")
        return self.phase, reasons




def get_state(request: Request) -> ServerState:
    return request.app.state.kawhi
