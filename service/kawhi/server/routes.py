"""HTTP routes: /v1/reweight, /v1/images, /v1/info, /healthz, /readyz, /metrics.

Framing only: each route reads what HTTP brings (the body under ``body_timeout_s``,
408 for a stalled client; the caller's deadline from ``X-Request-Timeout``; the
connection, watched for a disconnect) and hands it to the serving core
(``kawhi.pipeline.service.ReweightService``, reached through ``get_service``), which
owns admission, idempotency, the queue, deadlines, drain and the image store. Errors
are KawhiErrors rendered as problem+json by the app's handler.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from kawhi_client.schema import Problem, ReweightResponse
from starlette.responses import JSONResponse, PlainTextResponse, Response

from kawhi import __version__
from kawhi.engine.images import ImageLimits
from kawhi.errors import PROBLEM_MEDIA_TYPE, KawhiError, pointer
from kawhi.pipeline.answers import JSON
from kawhi.pipeline.service import ReweightService
from kawhi.server.auth import require_api_key
from kawhi.server.problems import problem_response

log = logging.getLogger("kawhi.server")

_PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": desc}
    for code, desc in {
        400: "malformed JSON",
        401: "missing or wrong API key",
        404: "unknown image hash",
        408: "the body did not arrive in time",
        413: "a size limit was exceeded",
        415: "unsupported media type",
        422: "invalid request (pointer names the field)",
        429: "queue full; see Retry-After",
        503: "loading or draining; see Retry-After",
        504: "request deadline exceeded",
    }.items()
}

_IMAGE_LIMITS = ImageLimits()  # the defaults; GET /v1/info answers the limits a server enforces
_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": desc}
    for code, desc in {
        413: f"the image is over max_image_bytes (default {_IMAGE_LIMITS.max_bytes} bytes) or its header says "
             f"more than max_image_pixels (default {_IMAGE_LIMITS.max_pixels} pixels), or the body is over "
             "max_body_bytes; limits in GET /v1/info",
        415: "never answered here: the Content-Type is not trusted, the bytes are sniffed (a body that is not "
             "an image is 422)",
        422: f"not a {'/'.join(_IMAGE_LIMITS.formats)} image, an empty body or multipart without a file part, "
             f"a side under min_image_side (default {_IMAGE_LIMITS.min_side} px) or an aspect ratio over "
             f"{_IMAGE_LIMITS.max_aspect_ratio:g}",
    }.items()
}

# The caller's own deadline in seconds; the server's request_timeout_s bounds it from above.
TIMEOUT_HEADER = "x-request-timeout"


def get_service(request: Request) -> ReweightService:
    return request.app.state.kawhi


def caller_timeout(request: Request) -> float | None:
    """The ``X-Request-Timeout`` seconds the caller gave (None when it gave none)."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise KawhiError("validation", "the X-Request-Timeout header must be a positive number of seconds")
    return value


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The whole body, or 408 when the client does not send it within ``timeout_s`` (a client
    that closes the connection first raises starlette's ClientDisconnect: answered 499)."""
    try:
        return await asyncio.wait_for(request.body(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise KawhiError("request-timeout", f"the request body did not arrive within {timeout_s:g} s") from None


def disconnect_watch(request: Request) -> Any:
    """What the service awaits to learn that the client went away (the body is read already)."""
    async def wait_disconnect() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    return wait_disconnect


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_PROBLEM_RESPONSES)


# ====================================================================== probes


@router.get("/health", tags=["probes"], summary="liveness, as /healthz (the name TEI, vLLM and infinity use)")
@router.get("/healthz", tags=["probes"], summary="liveness: the process answers")
async def healthz(state: ReweightService = Depends(get_service)) -> Response:
    return JSONResponse({"status": "ok", "phase": state.phase, "version": __version__})


@router.get("/readyz", tags=["probes"], summary="readiness: loading | ready | degraded | draining | failed")
async def readyz(request: Request, state: ReweightService = Depends(get_service)) -> Response:
    phase, reasons = state.readiness()
    if phase in ("ready", "degraded"):
        return JSONResponse({"state": phase, "reasons": reasons})
    slug = {"loading": "loading", "draining": "draining"}.get(phase, "unavailable")
    err = KawhiError(slug, "; ".join(reasons) or phase, headers={"Retry-After": "2"}, state=phase, reasons=reasons)
    return problem_response(err, getattr(request.state, "request_id", None))


@router.get(
    "/metrics",
    tags=["probes"],
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "the Prometheus text exposition format (version 0.0.4), not JSON",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: ReweightService = Depends(get_service)) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


# ====================================================================== info


@v1.get("/info", tags=["v1"], summary="model, tokenizer fingerprint, head set, limits, defaults, version")
async def info(state: ReweightService = Depends(get_service)) -> Response:
    return JSONResponse(state.info().to_dict())


# ====================================================================== images


@v1.post(
    "/images",
    tags=["v1"],
    summary="upload image bytes (raw body or multipart); answers the sha256 to reference them by",
    responses=_IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
                },
            },
        }
    },
)
async def upload_image(request: Request, state: ReweightService = Depends(get_service)) -> Response:
    if state.draining:
        state.require_engine()  # raises the draining 503
    state.enter()
    try:
        ctype = request.headers.get("content-type", "").lower()
        if ctype.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=8) as form:  # closes the spooled files
                name, upload = next(
                    ((k, v) for k, v in form.multi_items() if hasattr(v, "read")), (None, None)
                )
                if upload is None:
                    raise KawhiError("validation", "the multipart body holds no file part", "/file")
                data = await upload.read()
            ptr = pointer(name)
        else:
            data = await read_body(request, state.settings.body_timeout_s)
            ptr = ""
        stored = await state.store_image(data, ptr)
        return JSONResponse(stored.to_dict())
    finally:
        state.leave()


# ====================================================================== reweight


@v1.post(
    "/reweight",
    tags=["v1"],
    summary="reweight the advantages of rollout groups (docs/api.md)",
    response_model=ReweightResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReweightRequest"}}},
        }
    },
)
async def reweight(request: Request, state: ReweightService = Depends(get_service)) -> Response:
    state.require_engine()  # 503 while loading or draining
    deadline = state.deadline(caller_timeout(request))
    state.enter()
    try:
        body = await read_body(request, state.settings.body_timeout_s)
        admission = await state.admit_body(body, request.headers.get("content-type", ""))  # missing -> 415
        # a client gone before its answer: ClientClosed, answered 499 by the app's handler
        answer = await state.reweight(admission, deadline, JSON, client_gone=disconnect_watch(request))
        return Response(answer.payload, media_type="application/json", headers={"X-Kawhi-Cache": answer.source})
    finally:
        state.leave()
