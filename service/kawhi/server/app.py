"""The FastAPI application: factory, lifespan, shared state and error handling.

``create_app(settings, engine=None)`` builds an app whose lifespan

* prints the settings once (secrets redacted),
* connects the caches (Redis if configured, degraded-but-serving if it is not there),
* loads the engine in a background thread, so ``/healthz`` answers at once and
  ``/readyz`` says ``loading`` until the model is ready (pass ``engine=`` to serve an
  already-loaded engine: tests and embedding),
* starts the batcher's forward thread, and on shutdown drains it.

Routes live in ``kawhi.server.routes``; everything they share is one ``ServerState``
reached through FastAPI dependencies (``get_state``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kawhi import __version__
from kawhi.server.batcher import Batcher
from kawhi.server.cache import Caches
from kawhi.server.metrics import Metrics
from kawhi.server.middleware import RequestContextMiddleware, _BodyTooLarge
from kawhi.server.problems import (
    TYPE_BASE,
    ProblemError,
    problem_response,
    validation_problem,
)
from kawhi.server.settings import Settings

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
        s.model, device=s.device, dtype=s.dtype, defaults=s.method_config(), limits=engine_limits(s)
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
        self.batcher: Optional[Batcher] = None
        self.phase = "loading"  # loading | ready | failed | draining | stopped
        self.load_error: Optional[str] = None
        self.draining = False
        self.prepare_pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="kawhi-prepare")
        self.inflight: dict[str, asyncio.Future] = {}  # idempotency key -> response bytes being computed
        self.active = 0  # /v1 requests being served (what a drain waits for)
        self._active_lock = threading.Lock()
        self._given_engine = engine
        self.started_at = time.time()
        self.image_limits: Any = None

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
        """The engine, or the 503 that says why there is none yet."""
        if self.draining:
            raise ProblemError(
                503, "draining", "the server is shutting down; retry on another replica", "",
                headers={"Retry-After": "5"},
            )
        if self.engine is None:
            if self.phase == "failed":
                raise ProblemError(503, "unavailable", f"the model failed to load: {self.load_error}", "")
            raise ProblemError(503, "loading", "the reference model is loading", "", headers={"Retry-After": "2"})
        return self.engine

    # ------------------------------------------------------------------ drain
    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.phase = "draining"
            log.info("draining: refusing new work, finishing in-flight requests", extra={"in_flight": self.active})

    def enter(self) -> None:
        with self._active_lock:
            self.active += 1

    def leave(self) -> None:
        with self._active_lock:
            self.active -= 1

    def idle(self) -> bool:
        return self.active == 0 and (self.batcher is None or not self.batcher.busy)

    # ------------------------------------------------------------------ errors
    def count_error(self, err: ProblemError) -> None:
        self.metrics.errors.labels(err.slug).inc()

    def readiness(self) -> tuple[str, list[str]]:
        reasons: list[str] = []
        if self.phase == "ready":
            degraded = self.caches.degraded
            if degraded:
                return "degraded", [degraded]
            return "ready", reasons
        if self.phase == "failed" and self.load_error:
            reasons.append(f"model failed to load: {self.load_error}")
        if self.phase == "loading":
            reasons.append("the reference model is loading")
        if self.phase == "draining":
            reasons.append("shutting down; in-flight work is finishing")
        return self.phase, reasons


def get_state(request: Request) -> ServerState:
    return request.app.state.kawhi


# ---------------------------------------------------------------------- lifespan


def _make_lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("settings", extra={"settings": state.settings.redacted()})
        state.build_limits()
        await state.caches.start()
        loader: Optional[asyncio.Task] = None
        if state._given_engine is not None:
            state.engine_ready(state._given_engine)
        else:

            async def load() -> None:
                t0 = time.perf_counter()
                try:
                    engine = await asyncio.to_thread(state.load_engine)
                except Exception as exc:  # keep serving /healthz and /readyz with the reason
                    state.phase = "failed"
                    state.load_error = f"{type(exc).__name__}: {exc}"
                    log.exception("model failed to load")
                    return
                log.info("model loaded", extra={"seconds": round(time.perf_counter() - t0, 3)})
                state.engine_ready(engine)

            loader = asyncio.create_task(load(), name="kawhi-load-engine")
        try:
            yield
        finally:
            state.begin_drain()
            if loader is not None and not loader.done():
                loader.cancel()
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, state.settings.drain_timeout_s)
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)
            await state.caches.stop()
            state.phase = "stopped"
            log.info("stopped")

    return lifespan


# ---------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def respond(request: Request, err: ProblemError) -> Response:
        state.count_error(err)
        rid = getattr(request.state, "request_id", None)
        return problem_response(err, rid)

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> Response:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for e in exc.errors():
            e = dict(e)
            loc = tuple(e.get("loc", ()))
            if loc and loc[0] in ("body", "query", "path", "header"):
                loc = loc[1:]
            e["loc"] = loc
            errors.append(e)
        return respond(request, validation_problem(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 415: "unsupported-media-type"}.get(
            exc.status_code, "http-error"
        )
        detail = exc.detail if isinstance(exc.detail, str) else ""
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        err = ProblemError(exc.status_code, slug, detail, "", headers=dict(exc.headers or {}))
        return respond(request, err)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> Response:
        limit = state.settings.max_body_bytes
        return respond(request, ProblemError(413, "too-large", f"request body exceeds {limit} bytes", ""))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
        return respond(request, ProblemError(500, "internal", "an unexpected error occurred; it has been logged", ""))


# ---------------------------------------------------------------------- OpenAPI


def _install_openapi(app: FastAPI) -> None:
    """Add the wire request model (parsed by hand for pointer-precise errors) to /docs."""
    from kawhi_client.schema import Problem, ReweightRequest

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ReweightRequest, Problem):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components.setdefault(model.__name__, js)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---------------------------------------------------------------------- factory


def create_app(settings: Any = None, *, engine: Any = None) -> FastAPI:
    """A new app. ``settings`` defaults to ``Settings()`` (env + defaults); ``engine`` to loading one."""
    settings = settings if settings is not None else Settings()
    state = ServerState(settings, engine)
    app = FastAPI(
        title="kawhi",
        version=__version__,
        description=(
            "KAWHI reward shaping: per-paragraph reweighting of GRPO-style advantages by visual alignment. "
            f"Errors are application/problem+json (RFC 9457) with a JSON `pointer`; types under `{TYPE_BASE}`."
        ),
        lifespan=_make_lifespan(state),
        root_path=settings.root_path,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.kawhi = state
    _install_error_handlers(app, state)
    app.add_middleware(RequestContextMiddleware, state=state)
    if settings.gzip_min_bytes:
        from starlette.middleware.gzip import GZipMiddleware

        app.add_middleware(GZipMiddleware, minimum_size=settings.gzip_min_bytes)

    from kawhi.server.routes import router, v1

    app.include_router(router)
    app.include_router(v1)
    _install_openapi(app)
    return app
