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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from kawhi import __version__
from kawhi.errors import TYPE_BASE, KawhiError
from kawhi.pipeline.parse import validation_error
from kawhi.server.middleware import RequestContextMiddleware, _BodyTooLarge
from kawhi.server.problems import problem_response
from kawhi.server.settings import Settings
from kawhi.server.state import ServerState, engine_limits, get_state, load_engine  # noqa: F401 (re-exported)

log = logging.getLogger("kawhi.server")


# ---------------------------------------------------------------------- lifespan


def load_failure_reason(exc: BaseException) -> str:
    """One line for an operator: the exception's type and the first line of its message."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _make_lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("settings", extra={"settings": state.settings.redacted()})
        state.build_limits()
        state.loop = asyncio.get_running_loop()
        await state.caches.start()
        loader: asyncio.Task | None = None
        if state._given_engine is not None:
            state.engine_ready(state._given_engine)
        else:

            async def load() -> None:
                t0 = time.perf_counter()
                try:
                    engine = await asyncio.to_thread(state.load_engine)
                except Exception as exc:  # keep serving /healthz and /readyz with the reason
                    state.phase = "failed"
                    state.load_error = load_failure_reason(exc)
                    log.error("model failed to load: %s", state.load_error)
                    log.debug("model load traceback", exc_info=True)
                    if state.on_load_failure is not None:
                        state.on_load_failure(state.load_error)
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
                await asyncio.to_thread(state.batcher.stop, state.drain_left())
            state.prepare_pool.shutdown(wait=False, cancel_futures=True)
            await state.caches.stop()
            state.phase = "stopped"
            log.info("stopped")

    return lifespan


# ---------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    def respond(request: Request, err: KawhiError) -> Response:
        state.count_error(err)
        rid = getattr(request.state, "request_id", None)
        return problem_response(err, rid)

    @app.exception_handler(KawhiError)
    async def _problem(request: Request, exc: KawhiError) -> Response:
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
        return respond(request, validation_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 415: "unsupported-media-type"}.get(
            exc.status_code, "bad-request"
        )
        detail = exc.detail if isinstance(exc.detail, str) else ""
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        err = KawhiError(slug if exc.status_code in (404, 405, 413, 415) else "bad-request", detail,
                         headers=dict(exc.headers or {}))
        return respond(request, err)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> Response:
        limit = state.settings.max_body_bytes
        return respond(request, KawhiError("too-large", f"request body exceeds {limit} bytes"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
        return respond(request, KawhiError("internal", "an unexpected error occurred; it has been logged"))


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

    import kawhi.server.explain  # noqa: F401  (adds POST /v1/explain to v1)
    from kawhi.server.routes import router, v1

    app.include_router(router)
    app.include_router(v1)
    _install_openapi(app)
    return app
