"""HTTP routes: /v1/reweight, /v1/images, /v1/info, /healthz, /readyz, /metrics.

Thin: ``POST /v1/reweight`` is the request pipeline (kawhi.pipeline) driven by
``kawhi.server.reweight``; errors are KawhiErrors rendered as problem+json by the
app's handler. Shared state comes from ``kawhi.server.state`` through ``get_state``.
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
from kawhi.server import reweight as reweight_call
from kawhi.server.auth import require_api_key
from kawhi.server.problems import problem_response
from kawhi.server.state import ServerState, get_state

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

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_PROBLEM_RESPONSES)


# ====================================================================== probes


@router.get("/health", tags=["probes"], summary="liveness, as /healthz (the name TEI, vLLM and infinity use)")
@router.get("/healthz", tags=["probes"], summary="liveness: the process answers")
async def healthz(state: ServerState = Depends(get_state)) -> Response:
    return JSONResponse({"status": "ok", "phase": state.phase, "version": __version__})


@router.get("/readyz", tags=["probes"], summary="readiness: loading | ready | degraded | draining | failed")
async def readyz(request: Request, state: ServerState = Depends(get_state)) -> Response:
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
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


# ====================================================================== info


@v1.get("/info", tags=["v1"], summary="model, tokenizer fingerprint, head set, limits, defaults, version")
async def info(state: ServerState = Depends(get_state)) -> Response:
    engine = state.require_engine()
    s = state.settings
    out = dict(engine.info())
    out["version"] = __version__
    limits = dict(out.get("limits") or {})
    limits.update(
        {
            "max_body_bytes": s.max_body_bytes,
            "max_groups": s.max_groups,
            "max_responses": s.max_responses_per_group,
            "max_response_tokens": s.max_tokens_per_response,
            "max_group_tokens": s.batch_tokens,
            "max_request_tokens": s.max_request_tokens,
            "max_image_bytes": s.max_image_bytes,
            "max_image_pixels": s.max_image_pixels,
            "min_image_side": s.min_image_side,
        }
    )
    out["limits"] = limits
    out["server"] = {
        "batch_tokens": s.batch_tokens,
        "batch_wait_ms": s.batch_wait_ms,
        "queue_groups": s.queue_groups,
        "request_timeout_s": s.request_timeout_s,
        "redis": state.caches.uses_redis,
        "redis_degraded": state.caches.degraded is not None,
        "auth": bool(state.api_keys),
    }
    return JSONResponse(out)


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
async def upload_image(request: Request, state: ServerState = Depends(get_state)) -> Response:
    from kawhi.engine.images import decode_image, sha256_hex

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
            data = await reweight_call.read_body(request, state.settings.body_timeout_s)
            ptr = ""
        if not data:
            raise KawhiError("invalid-image", "the body holds no image bytes", ptr)
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(state.prepare_pool, decode_image, data, state.image_limits, "")
        except KawhiError as exc:
            raise exc.placed(ptr) from None
        sha = sha256_hex(data)
        await state.caches.aset("image", sha, data)
        return JSONResponse({"sha256": sha, "bytes": len(data), "width": image.width, "height": image.height})
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
async def reweight(request: Request, state: ServerState = Depends(get_state)) -> Response:
    pipeline = state.pipeline()  # 503 while loading or draining
    state.enter()
    try:
        return await reweight_call.handle(request, state, pipeline)
    finally:
        state.leave()
