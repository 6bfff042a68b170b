"""The serving core: one ``ReweightService`` under every asynchronous front end (HTTP, gRPC).

The front ends frame (read a body or a message, write bytes or a message); everything
else is here, once:

* lifecycle: the caches (Redis or in-process), the engine loaded off the event loop,
  the batcher's forward thread, readiness (``loading | ready | degraded | draining |
  failed``), and the drain a SIGTERM starts;
* admission: the pipeline's parse and admit (off the event loop for big requests),
  the queue's places (``queue-full`` + Retry-After), limits built once from the settings;
* idempotency: a stored answer is returned as is, and a retry that arrives while the
  first attempt runs waits for it (key: canonical groups with images by hash, resolved
  options, model, tokenizer, version, and the codec the answer is stored in);
* the deadline of every request (``request_timeout_s``, tightened by the caller's own):
  it bounds the wait for a joined attempt, the queue, the prepare thread and the
  forward; past it the request answers the catalogue's ``timeout`` and its queued
  groups are dropped;
* the watch: a client that goes away (``client_gone``) drops its queued groups and
  gets ``ClientClosed``; a drain that reaches its deadline answers ``draining``;
* the image store (``store_image``) and ``info()`` (typed: :class:`Info`).

``reweight`` answers an :class:`Answer` whose ``payload`` is what the front end's
:class:`Codec` made of the model (JSON bytes for HTTP, a protobuf message for gRPC,
built straight from the model) and whose ``response`` is the model itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kawhi_client.schema import ReweightResponse

from kawhi import __version__
from kawhi.errors import KawhiError
from kawhi.pipeline.answers import JSON, Answer, Codec, ImageInfo, Info, ServerInfo, idempotency_key
from kawhi.pipeline.batcher import Batcher, QueueFull
from kawhi.pipeline.cache import Caches
from kawhi.pipeline.core import Admission, Pipeline, outcome
from kawhi.pipeline.encoding import wire_of
from kawhi.pipeline.limits import limits_of_settings, load_engine
from kawhi.pipeline.metrics import Metrics
from kawhi.pipeline.parse import ParsedRequest

log = logging.getLogger("kawhi.server")

# Requests larger than this (body bytes, or groups of a decoded message) are parsed and
# admitted in a worker thread rather than on the event loop.
INLINE_PARSE_BYTES = 256 * 1024
INLINE_PARSE_GROUPS = 8
# Answers covering more tokens than this are encoded in a worker thread.
INLINE_ENCODE_TOKENS = 16384


class ClientClosed(Exception):
    """The client went away before its answer was ready (its queued groups were dropped)."""


def load_failure_reason(exc: BaseException) -> str:
    """One line for an operator: the exception's type and the first line of its message."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


class ReweightService:
    """The serving core (see the module doc). One per process; every front end shares it."""

    def __init__(self, settings: Any, engine: Any = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.api_keys = settings.api_key_list()
        self.caches = Caches(
            self.metrics,
            redis_url=settings.redis_url,
            redis_timeout_s=settings.redis_timeout_s,
            redis_retry_s=settings.redis_retry_s,
            max_bytes={"image": settings.cache_image_bytes, "result": settings.cache_result_bytes,
                       "region": settings.cache_region_bytes},
            ttl_s={"image": settings.image_ttl_s, "result": settings.result_ttl_s, "region": settings.region_ttl_s},
        )
        self.region_cache = self.caches.region_cache()
        self.limits = limits_of_settings(settings)
        self.image_limits = self.limits.image
        self.engine: Any = None
        self.batcher: Batcher | None = None
        self.phase = "loading"  # loading | ready | failed | draining | stopped
        self.load_error: str | None = None
        # kawhi serve sets this: a model that cannot load ends the process (exit 1, one line) so a
        # pod crash-loops with a readable reason; a service built in-process keeps answering /readyz.
        self.on_load_failure: Any = None
        self.draining = False
        self.prepare_pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="kawhi-prepare")
        self.inflight: dict[str, asyncio.Future] = {}  # idempotency key -> payload being computed
        self.active = 0  # requests being served, on every front end (what a drain waits for)
        self._active_lock = threading.Lock()
        self._given_engine = engine
        self._loader: asyncio.Task | None = None
        self._pipeline: Pipeline | None = None
        self.started_at = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self.drain_expired = asyncio.Event()  # set when the drain deadline is near: in-flight work answers 503
        self.drain_deadline: float | None = None  # time.monotonic() by which the process is gone

    # ================================================================== lifecycle
    async def start(self) -> None:
        """Connect the caches and load the engine in the background (``readiness`` says when)."""
        log.info("settings", extra={"settings": self.settings.redacted()})
        self.loop = asyncio.get_running_loop()
        await self.caches.start()
        if self._given_engine is not None:
            self.engine_ready(self._given_engine)
            return

        async def load() -> None:
            t0 = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self.load_engine)
            except Exception as exc:  # keep answering the probes with the reason
                self.phase = "failed"
                self.load_error = load_failure_reason(exc)
                log.error("model failed to load: %s", self.load_error)
                log.debug("model load traceback", exc_info=True)
                if self.on_load_failure is not None:
                    self.on_load_failure(self.load_error)
                return
            log.info("model loaded", extra={"seconds": round(time.perf_counter() - t0, 3)})
            self.engine_ready(engine)

        self._loader = asyncio.create_task(load(), name="kawhi-load-engine")

    async def stop(self) -> None:
        """Refuse new work, let the batcher finish within the drain deadline, close the caches."""
        self.begin_drain()
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop, self.drain_left())
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)
        await self.caches.stop()
        self.phase = "stopped"
        log.info("stopped")

    def load_engine(self) -> Any:
        return load_engine(self.settings)

    def engine_ready(self, engine: Any) -> None:
        s = self.settings
        self.engine = engine
        self.batcher = Batcher(engine, self.metrics, batch_tokens=s.batch_tokens, max_wait_s=s.batch_wait_ms / 1000.0,
                               capacity=s.queue_groups, thread_init=self._init_forward_thread)
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

    def pipeline(self) -> Pipeline:
        """The request pipeline over the engine, with the service's limits and region cache."""
        engine = self.require_engine()
        if self._pipeline is None or self._pipeline.engine is not engine:
            limits = limits_of_settings(self.settings, engine.model.max_positions)
            self._pipeline = Pipeline(engine, limits, region_cache=self.region_cache)
        return self._pipeline

    def readiness(self) -> tuple[str, list[str]]:
        if self.phase == "ready":
            if self.caches.degraded:  # the reason (host, port, exception) is in the log, not here
                return "degraded", ["redis is unreachable; serving from the in-process cache"]
            return "ready", []
        failed = f"the model failed to load: {self.load_error}" if self.load_error else \
            "the model failed to load; see the server log"
        reasons = {"failed": [failed],
                   "loading": ["the reference model is loading"],
                   "draining": ["shutting down; in-flight work is finishing"]}.get(self.phase, [])
        return self.phase, list(reasons)

    # ================================================================== drain
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

    def count_error(self, err: KawhiError) -> None:
        self.metrics.errors.labels(err.slug).inc()

    # ================================================================== deadlines
    def deadline(self, caller_timeout_s: float | None = None) -> float:
        """The ``time.monotonic()`` by which a request arriving now must answer: the server's
        ``request_timeout_s``, or the caller's own when it is shorter."""
        limit = self.settings.request_timeout_s
        if caller_timeout_s is not None:
            limit = min(limit, max(0.0, caller_timeout_s))
        return time.monotonic() + limit

    def timeout_error(self, deadline: float) -> KawhiError:
        return KawhiError("timeout", "no answer within the request's deadline "
                          f"(at most {self.settings.request_timeout_s:g} s)")

    async def _until(self, deadline: float, work: Awaitable[Any]) -> Any:
        """``work`` within the deadline, or the catalogue's ``timeout`` (work cancelled)."""
        try:
            # wait_for, not asyncio.timeout: the package supports Python 3.10
            return await asyncio.wait_for(work, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise self.timeout_error(deadline) from None

    # ================================================================== admission
    def _admit(self, parsed: ParsedRequest) -> Admission:
        return self.pipeline().admit(parsed, queue_capacity=self.settings.queue_groups, allow_paths=False)

    async def admit_body(self, body: bytes, content_type: str | None) -> Admission:
        """Parse and admit a JSON body (no model work; off the event loop when it is big)."""
        pipeline = self.pipeline()  # 503 while loading or draining
        if len(body) > INLINE_PARSE_BYTES:
            return await asyncio.to_thread(lambda: self._admit(pipeline.parse_body(body, content_type)))
        return self._admit(pipeline.parse_body(body, content_type))

    async def admit_parsed(self, parse: Callable[[], ParsedRequest], size: int) -> Admission:
        """Admit what ``parse()`` gives (a decoded message; ``size`` groups: big ones off the loop)."""
        self.pipeline()
        if size > INLINE_PARSE_GROUPS:
            return await asyncio.to_thread(lambda: self._admit(parse()))
        return self._admit(parse())

    def reserve(self, n: int) -> Any:
        """``n`` places in the batcher's queue (a Ticket), or the queue-full 429 with Retry-After."""
        assert self.batcher is not None
        try:
            return self.batcher.reserve(n)
        except QueueFull as exc:
            raise KawhiError("queue-full", f"{exc.pending} groups are waiting (capacity {exc.capacity}); retry later",
                             headers={"Retry-After": str(exc.retry_after)}) from None

    # ================================================================== reweight
    async def reweight(self, admission: Admission, deadline: float, codec: Codec = JSON, *,
                       client_gone: Callable[[], Awaitable[Any]] | None = None) -> Answer:
        """The answer of an admitted request (see the module doc for what bounds and watches it)."""
        pipeline = self.pipeline()
        started = time.perf_counter()
        key = idempotency_key(pipeline, admission, codec.name) if not admission.errors else None
        owner: asyncio.Future | None = None
        if key is not None:
            while True:
                stored = await self.caches.aget("result", key)
                if stored is not None:
                    return Answer(codec.decode(stored), "hit")
                running = self.inflight.get(key)
                if running is None:
                    owner = asyncio.get_running_loop().create_future()
                    self.inflight[key] = owner
                    break
                done = await self._until(deadline, asyncio.shield(running))
                if done is not None:
                    return Answer(done, "joined")
                # the first attempt failed: try again ourselves
        payload: Any = None
        try:
            response, cacheable = await self._watched(
                self._compute(pipeline, admission, deadline, started), client_gone)
            wire = wire_of(admission.parsed)
            if response.usage.tokens > INLINE_ENCODE_TOKENS:
                payload, data = await asyncio.to_thread(codec.encode, response, wire)
            else:
                payload, data = codec.encode(response, wire)
            if key is not None and cacheable:
                await self.caches.aset("result", key, data)
            return Answer(payload, "miss", response)
        finally:
            if owner is not None:
                self.inflight.pop(key, None)  # type: ignore[arg-type]
                if not owner.done():
                    owner.set_result(payload)

    async def _watched(self, work: Awaitable[Any], client_gone: Callable[[], Awaitable[Any]] | None) -> Any:
        """``work`` unless the client goes away (ClientClosed) or the drain deadline comes (503)."""
        task = asyncio.ensure_future(work)
        watchers = {asyncio.ensure_future(self.drain_expired.wait()): "drain"}
        if client_gone is not None:
            watchers[asyncio.ensure_future(client_gone())] = "client"
        try:
            done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the caller went away (gRPC): the work's cancellation drops its groups
            task.cancel()
            raise
        finally:
            for w in watchers:
                w.cancel()
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:  # the cancellation (or whatever the work raised meanwhile) ends here
            pass
        reason = next(watchers[w] for w in done if w in watchers)
        if reason == "drain":
            raise KawhiError("draining", "the server is shutting down and this request could not finish in time; "
                             "retry on another replica", headers={"Retry-After": "1"})
        self.metrics.errors.labels("client-closed").inc()
        log.info("client closed the request; its queued groups were dropped")
        raise ClientClosed()

    async def _images(self, admission: Admission) -> dict[str, bytes]:
        images: dict[str, bytes] = {}
        for a in admission.groups:
            if a.data is None and a.sha256 not in images:
                data = await self.caches.aget("image", a.sha256)
                if data is not None:
                    images[a.sha256] = data
        return images

    async def _run(self, pipeline: Pipeline, admission: Admission, deadline: float, *,
                   explain: bool = False) -> tuple[dict[int, Any], int]:
        """Queue places, prepare, forward -- all within the deadline. Outcomes by group index."""
        ticket = self.reserve(len(admission.groups))
        outcomes: dict[int, Any] = {}
        tokens = 0

        async def run_groups() -> None:
            nonlocal tokens
            images = await self._images(admission)
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            prepared = await loop.run_in_executor(
                self.prepare_pool,
                lambda: pipeline.prepare_all(admission, images, cancelled=lambda: ticket.cancelled, explain=explain))
            self.metrics.prepare_seconds.observe(time.perf_counter() - t0)
            for a in admission.groups:
                if a.data is not None:
                    self.caches.set("image", a.sha256, a.data)  # later requests may send just the hash
            tokens = pipeline.check_request_tokens(prepared)
            ticket.release(ticket.held - len(prepared))  # slots of groups that failed go back now
            assert self.batcher is not None
            results = await asyncio.gather(*self.batcher.submit(ticket, prepared))
            for p, result in zip(prepared, results):
                outcomes[p.index] = outcome(result) if not explain else (outcome(result), result)

        try:
            await self._until(deadline, run_groups())
        except KawhiError as exc:
            ticket.cancel("timeout" if exc.slug == "timeout" else "error")
            raise
        except asyncio.CancelledError:
            ticket.cancel("client-closed")
            raise
        except BaseException:
            ticket.cancel("error")
            raise
        ticket.release()
        return outcomes, tokens

    async def _compute(self, pipeline: Pipeline, admission: Admission, deadline: float,
                       started: float) -> tuple[ReweightResponse, bool]:
        outcomes, tokens = await self._run(pipeline, admission, deadline)
        for err in admission.errors.values():
            self.count_error(err)
        response = pipeline.assemble(admission, outcomes, tokens, started)
        for i, res in enumerate(response.results):
            if res.error is not None and i not in admission.errors:
                self.metrics.errors.labels(res.error.type.rsplit("/", 1)[-1]).inc()
        return response, not admission.errors and all(r.error is None for r in response.results)

    # ================================================================== explain
    async def explain(self, admission: Admission, deadline: float, *, heatmap: int | None = None,
                      client_gone: Callable[[], Awaitable[Any]] | None = None) -> Any:
        """The explain view (kawhi_client.explain.Explanation) of a one-group request, through
        the same queue, deadline and watch as a reweight. Errors are placed at ``/groups/0``."""
        from kawhi.pipeline.explain import explanation_for

        pipeline = self.pipeline()
        parsed = admission.parsed
        if len(parsed.groups) != 1:
            raise KawhiError("validation", f"explain draws exactly one group, got {len(parsed.groups)}; "
                             "send one request per group", "/groups")
        if admission.errors:
            raise admission.errors[0].placed(parsed.prefix(0))
        admitted = admission.groups[0]
        if heatmap is not None and heatmap >= len(admitted.group.responses):
            raise KawhiError("validation", f"heatmap={heatmap} but the group has {len(admitted.group.responses)} "
                             "responses (0-based)")
        # a group prepare refuses raises placed (an explain request never asks for per-group errors)
        outcomes, _ = await self._watched(self._run(pipeline, admission, deadline, explain=True), client_gone)
        if 0 in admission.errors:  # kept, not raised, when the request asked for per-group errors
            raise admission.errors[0].placed(parsed.prefix(0))
        checked, result = outcomes[0]
        if isinstance(checked, KawhiError):
            raise checked.placed(parsed.prefix(0))
        data = admitted.data if admitted.data is not None else await self.caches.aget("image", admitted.sha256)
        if data is None:  # evicted between the forward and the drawing
            raise KawhiError("image-not-found", f"no image with sha256 {admitted.sha256} is held any more; send its "
                             "bytes (image.data)", parsed.prefix(0) + "/image/sha256", sha256=admitted.sha256)

        def build() -> Any:
            from kawhi.engine.images import decode_image

            image = decode_image(data, self.image_limits)
            return explanation_for(pipeline.engine, admitted.group, result, image, heatmap_response=heatmap,
                                   config=admission.config)

        return await self._until(deadline, asyncio.to_thread(build))

    # ================================================================== images, info
    async def store_image(self, data: bytes, pointer: str = "") -> ImageInfo:
        """Keep image bytes for later requests that send only the hash; the image is checked
        against the limits first (``invalid-image``, ``too-large`` at ``pointer``)."""
        from kawhi.engine.images import decode_image, sha256_hex

        if self.draining:
            self.require_engine()  # raises the draining 503
        if not data:
            raise KawhiError("invalid-image", "the body holds no image bytes", pointer)
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self.prepare_pool, decode_image, data, self.image_limits, "")
        except KawhiError as exc:
            raise exc.placed(pointer) from None
        sha = sha256_hex(data)
        await self.caches.aset("image", sha, data)
        return ImageInfo(sha, len(data), image.width, image.height)

    def info(self) -> Info:
        engine = self.require_engine()
        s = self.settings
        described = dict(engine.info())
        limits = dict(described.pop("limits", None) or {})
        limits.update({
            "max_body_bytes": s.max_body_bytes, "max_groups": s.max_groups, "max_responses": s.max_responses_per_group,
            "max_response_tokens": s.max_tokens_per_response, "max_group_tokens": s.batch_tokens,
            "max_request_tokens": s.max_request_tokens, "max_image_bytes": s.max_image_bytes,
            "max_image_pixels": s.max_image_pixels, "min_image_side": s.min_image_side,
        })
        server = ServerInfo(batch_tokens=s.batch_tokens, batch_wait_ms=s.batch_wait_ms, queue_groups=s.queue_groups,
                            request_timeout_s=s.request_timeout_s, redis=self.caches.uses_redis,
                            redis_degraded=self.caches.degraded is not None, auth=bool(self.api_keys))
        described.pop("version", None)
        return Info(engine=described, limits=limits, server=server)


__all__ = ["ClientClosed", "ReweightService"]
