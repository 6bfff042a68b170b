"""The FastAPI application: HTTP framing over the serving core (kawhi.pipeline.service).

``create_app(settings, engine=None, service=None)`` builds an app whose lifespan starts
the ``ReweightService`` (settings logged with secrets redacted, caches connected, the
engine loaded in a background thread so ``/healthz`` answers at once and ``/readyz``
says ``loading`` until it is ready) and stops it (drain, batcher, caches). The app adds
what is HTTP's own: problem+json error rendering, the request-context middleware,
gzip, OpenAPI. Routes live in ``kawhi.server.routes`` and reach the service through
the ``get_service`` dependency.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from kawhi import __version__
from kawhi.errors import TYPE_BASE, KawhiError
from kawhi.pipeline.parse import validation_error
from kawhi.pipeline.service import ClientClosed, ReweightService
from kawhi.server.middleware import RequestContextMiddleware, _BodyTooLarge
from kawhi.server.problems import problem_response
from kawhi.settings import Settings

log = logging.getLogger("kawhi.server")


# ---------------------------------------------------------------------- lifespan


def _make_lifespan(service: ReweightService):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    return lifespan


# ---------------------------------------------------------------------- errors


def _install_error_handlers(app: FastAPI, state: ReweightService) -> None:
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

    # The client went away: nobody reads an answer. 499 is what the access log and the metrics
    # record (not a 5xx: the alert on 5xx is about the server); no traceback, one info line.
    @app.exception_handler(ClientDisconnect)
    async def _gone_while_sending(request: Request, exc: ClientDisconnect) -> Response:
        state.count_error(KawhiError("client-closed", "the client closed the connection while sending its body"))
        log.info("client closed the request while sending its body")
        return Response(status_code=499)

    @app.exception_handler(ClientClosed)
    async def _gone_while_waiting(request: Request, exc: ClientClosed) -> Response:
        return Response(status_code=499)  # counted and logged by the service, which dropped the queued groups

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


def create_app(settings: Any = None, *, engine: Any = None, service: ReweightService | None = None) -> FastAPI:
    """A new app over ``service`` (default: a new ReweightService of ``settings``, which default
    to ``Settings()``: env + defaults; ``engine``: an engine already loaded, else one is loaded).
    The app's lifespan starts and stops the service."""
    if service is None:
        service = ReweightService(settings if settings is not None else Settings(), engine)
    settings = service.settings
    state = service
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
