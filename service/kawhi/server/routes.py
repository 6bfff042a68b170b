"""HTTP routes: /v1/reweight, /v1/images, /v1/info, /healthz, /readyz, /metrics.

The life of a ``POST /v1/reweight``:

1. parse and validate the JSON by hand (pydantic wire models), so every error gets
   a pointer into the document; with ``per_group_errors`` a bad group becomes that
   group's ``error`` and the others go on;
2. arrival checks that need no model (counts, sizes, base64, paths refused, hash
   format) -> 413/422 at once, never queued;
3. the idempotency key (canonical groups with images by hash + resolved options +
   model + tokenizer + version): a stored answer is returned as is, and a retry
   that arrives while the first attempt still runs waits for it;
4. admission against the queue (429 + Retry-After when full), then images from the
   cache (unknown hash -> 404), then ``Engine.prepare`` in the prepare thread;
5. the prepared groups join the batcher; the answer is assembled when every
   group's future resolves, all under the per-request deadline (504).
"""

from __future__ import annotations

import asyncio
import binascii
import base64
import hashlib
import json
import logging
import re
import time
from typing import Any, Optional

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from kawhi import __version__
from kawhi_client.schema import (
    GroupResult,
    Options,
    Problem,
    ReweightRequest,
    ReweightResponse,
    RolloutGroup,
    Usage,
)
from kawhi.server.app import ServerState, get_state
from kawhi.server.auth import require_api_key
from kawhi.server.batcher import QueueFull
from kawhi.server.encoding import WireFormat, encode_answer, wire_format
from kawhi.server.problems import (
    PROBLEM_MEDIA_TYPE,
    ProblemError,
    from_group_error,
    pointer,
    problem_response,
    validation_problem,
)

log = logging.getLogger("kawhi.server")

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

_PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": desc}
    for code, desc in {
        400: "malformed JSON",
        401: "missing or wrong API key",
        404: "unknown image hash",
        413: "a size limit was exceeded",
        415: "unsupported media type",
        422: "invalid request (pointer names the field)",
        429: "queue full; see Retry-After",
        503: "loading or draining; see Retry-After",
        504: "request deadline exceeded",
    }.items()
}

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_PROBLEM_RESPONSES)


# ====================================================================== probes


@router.get("/healthz", tags=["probes"], summary="liveness: the process answers")
async def healthz(state: ServerState = Depends(get_state)) -> Response:
    return JSONResponse({"status": "ok", "phase": state.phase, "version": __version__})


@router.get("/readyz", tags=["probes"], summary="readiness: loading | ready | degraded | draining | failed")
async def readyz(request: Request, state: ServerState = Depends(get_state)) -> Response:
    phase, reasons = state.readiness()
    if phase in ("ready", "degraded"):
        return JSONResponse({"state": phase, "reasons": reasons})
    slug = {"loading": "loading", "draining": "draining"}.get(phase, "unavailable")
    err = ProblemError(
        503, slug, "; ".join(reasons) or phase, "", headers={"Retry-After": "2"}, state=phase, reasons=reasons
    )
    return problem_response(err, getattr(request.state, "request_id", None))


@router.get("/metrics", tags=["probes"], summary="Prometheus metrics")
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
    from kawhi.engine.errors import GroupError
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
                    raise ProblemError(422, "validation", "the multipart body holds no file part", "/file")
                data = await upload.read()
            ptr = pointer(name)
        else:
            data = await request.body()
            ptr = ""
        if not data:
            raise ProblemError(422, "invalid-image", "the body holds no image bytes", ptr)
        if len(data) > state.settings.max_image_bytes:
            raise ProblemError(
                413, "too-large", f"image is {len(data)} bytes; the limit is {state.settings.max_image_bytes}", ptr
            )
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(state.prepare_pool, decode_image, data, state.image_limits, "")
        except GroupError as exc:
            raise from_group_error(exc, ptr) from None
        sha = sha256_hex(data)
        await state.caches.aset("image", sha, data)
        return JSONResponse({"sha256": sha, "bytes": len(data), "width": image.width, "height": image.height})
    finally:
        state.leave()


# ====================================================================== reweight


# Bodies larger than this are parsed in a worker thread rather than on the event loop.
INLINE_PARSE_BYTES = 256 * 1024
# Answers covering more tokens than this are serialised in a worker thread.
INLINE_SERIALIZE_TOKENS = 16384


async def _read_body(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ProblemError(415, "unsupported-media-type", f"send application/json, not {ctype}", "")
    body = await request.body()
    if not body:
        raise ProblemError(400, "malformed-json", "the request body is empty", "")
    return body


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProblemError(400, "malformed-json", f"the body is not valid JSON: {exc}", "") from None


def _parse_and_check(state: ServerState, engine: Any, body: bytes) -> tuple[Any, ...]:
    """Everything about a request that needs no model and no I/O (pure CPU, thread-safe).

    Returns (groups, raw_groups, config, per_group, arrived, bad, idempotency key, wire format); raises
    ProblemError for a request-level mistake, or for any mistake when per-group errors are off.
    """
    from kawhi.engine.errors import OptionsError

    s = state.settings
    obj = _parse_json(body)
    wire = wire_format(obj)
    groups, options, per_group, bad = _parse_request(obj)
    raw_groups = obj.get("groups") if isinstance(obj, dict) else None
    if len(groups) > s.max_groups:
        raise ProblemError(413, "too-large", f"{len(groups)} groups; the limit is {s.max_groups}", "/groups")
    if len(groups) > s.queue_groups:
        raise ProblemError(
            413, "too-large", f"{len(groups)} groups can never fit the queue ({s.queue_groups}); split the request",
            "/groups",
        )
    try:
        config = engine.resolve_options(options)
    except OptionsError as exc:
        raise ProblemError(
            422, "validation", exc.detail, pointer("options", exc.field) if exc.field != "options" else "/options"
        ) from None
    except ValueError as exc:
        raise ProblemError(422, "validation", str(exc), "/options") from None

    arrived: list[_Arrived] = []
    for i, group in enumerate(groups):
        if group is None:
            continue
        try:
            arrived.append(_arrival_check(state, i, group))
        except ProblemError as err:
            if not per_group:
                raise
            bad[i] = err
    key = _idempotency_key(engine, config, per_group, arrived, wire) if not bad else None
    return groups, raw_groups, config, per_group, arrived, bad, key, wire


def _parse_request(obj: Any) -> tuple[list[Optional[RolloutGroup]], Optional[Options], bool, dict[int, ProblemError]]:
    """The wire request, or per-group errors when the caller asked for them."""
    try:
        req = ReweightRequest.model_validate(obj)
        return list(req.groups), req.options, req.per_group_errors, {}
    except ValidationError as exc:
        errors = exc.errors()
        per_group = isinstance(obj, dict) and obj.get("per_group_errors") is True
        in_groups = all(
            len(e["loc"]) >= 2 and e["loc"][0] == "groups" and isinstance(e["loc"][1], int) for e in errors
        )
        if not (per_group and in_groups):
            raise validation_problem(exc) from None
    # Every error is inside some group: those groups fail, the rest go on.
    by_group: dict[int, list[Any]] = {}
    for e in errors:
        by_group.setdefault(e["loc"][1], []).append(e)
    groups: list[Optional[RolloutGroup]] = []
    bad: dict[int, ProblemError] = {}
    for i, raw in enumerate(obj["groups"]):
        if i in by_group:
            bad[i] = validation_problem(by_group[i])
            groups.append(None)
        else:
            groups.append(RolloutGroup.model_validate(raw))
    options = Options.model_validate(obj["options"]) if obj.get("options") is not None else None
    return groups, options, True, bad


class _Arrived:
    """One group after the arrival checks: image bytes (inline) or hash (to look up)."""

    __slots__ = ("index", "group", "sha", "data", "image_field")

    def __init__(self, index: int, group: RolloutGroup, sha: str, data: Optional[bytes], image_field: str) -> None:
        self.index = index
        self.group = group
        self.sha = sha
        self.data = data
        self.image_field = image_field


def _arrival_check(state: ServerState, i: int, group: RolloutGroup) -> _Arrived:
    """Checks that need no model; raises ProblemError (pointer into the request)."""
    s = state.settings
    img = group.image
    if img.path is not None:
        raise ProblemError(
            422, "path-not-allowed", "the HTTP server never reads a path or URL; send 'data' or 'sha256'",
            pointer("groups", i, "image", "path"),
        )
    n = len(group.responses)
    if n > s.max_responses_per_group:
        raise ProblemError(
            413, "too-large", f"{n} responses; the limit is {s.max_responses_per_group}",
            pointer("groups", i, "responses"),
        )
    for j, r in enumerate(group.responses):
        if r.token_ids is not None and len(r.token_ids) > s.max_tokens_per_response:
            raise ProblemError(
                413, "too-large", f"{len(r.token_ids)} tokens; the limit is {s.max_tokens_per_response}",
                pointer("groups", i, "responses", j, "token_ids"),
            )
    if group.advantages is not None and len(group.advantages) != n:
        raise ProblemError(
            422, "invalid-group", f"{len(group.advantages)} advantages for {n} responses",
            pointer("groups", i, "advantages"),
        )
    if img.data is not None:
        ptr = pointer("groups", i, "image", "data")
        approx = len(img.data) * 3 // 4
        if approx > s.max_image_bytes + 3:
            raise ProblemError(413, "too-large", f"image is ~{approx} bytes; the limit is {s.max_image_bytes}", ptr)
        try:
            data = base64.b64decode("".join(img.data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProblemError(422, "invalid-image", f"image data is not valid base64: {exc}", ptr) from None
        if not data:
            raise ProblemError(422, "invalid-image", "image data is empty", ptr)
        if len(data) > s.max_image_bytes:
            raise ProblemError(413, "too-large", f"image is {len(data)} bytes; the limit is {s.max_image_bytes}", ptr)
        return _Arrived(i, group, hashlib.sha256(data).hexdigest(), data, "data")
    sha = img.sha256 or ""
    if not _SHA256.match(sha):
        raise ProblemError(
            422, "validation", "sha256 must be 64 hex digits", pointer("groups", i, "image", "sha256")
        )
    return _Arrived(i, group, sha.lower(), None, "sha256")


def _idempotency_key(engine: Any, config: Any, per_group: bool, arrived: list[_Arrived],
                     wire: WireFormat = WireFormat()) -> str:
    groups = []
    for a in arrived:
        g = a.group.model_dump(mode="python")
        g["image"] = {"sha256": a.sha}
        groups.append(g)
    canonical = {
        "v": 1,
        "version": __version__,
        "model": engine.model_name,
        "tokenizer": engine.tokenizer_fingerprint,
        "options": config.to_dict(),
        "per_group_errors": per_group,
        "groups": groups,
    }
    if not wire.is_default:
        canonical["wire"] = [wire.encoding_format, wire.token_arrays]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _error_result(group: Optional[RolloutGroup], raw: Any, err: ProblemError) -> GroupResult:
    gid = group.id if group is not None else (raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else None)
    return GroupResult(id=gid, error=err.problem())


def _prepare_all(
    state: ServerState, engine: Any, config: Any, arrived: list[_Arrived], images: dict[str, bytes],
    per_group: bool, ticket: Any,
) -> tuple[list[Any], dict[int, ProblemError]]:
    """Runs in the prepare thread: decode + Engine.prepare for each group (stops at the first error
    unless per-group errors were asked for)."""
    from kawhi.engine.errors import GroupError
    from kawhi.engine.images import decode_image

    prepared: list[Any] = []
    errors: dict[int, ProblemError] = {}
    for a in arrived:
        if ticket.cancelled:
            break
        prefix = pointer("groups", a.index)
        t0 = time.perf_counter()
        try:
            data = a.data if a.data is not None else images[a.sha]
            image = decode_image(data, state.image_limits, f"/image/{a.image_field}")
            if a.data is not None:
                state.caches.set("image", a.sha, a.data)  # later requests may send just the hash
            p = engine.prepare(
                a.group, config, image, image_sha256=a.sha, index=a.index, region_cache=state.region_cache
            )
            if p.num_tokens > state.settings.batch_tokens:
                raise ProblemError(
                    413, "too-large",
                    f"the group needs {p.num_tokens} tokens; one forward holds at most {state.settings.batch_tokens}",
                    prefix,
                )
            prepared.append(p)
        except GroupError as exc:
            errors[a.index] = from_group_error(exc, prefix)
        except ProblemError as exc:
            errors[a.index] = exc
        except Exception:  # an engine bug must not take the other groups (or requests) with it
            log.exception("prepare failed", extra={"group": a.index})
            errors[a.index] = ProblemError(
                500, "internal", "preparing this group failed unexpectedly; it has been logged", prefix
            )
        finally:
            state.metrics.prepare_seconds.observe(time.perf_counter() - t0)
        if errors and not per_group:
            break
    return prepared, errors


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
    engine = state.require_engine()
    state.enter()
    try:
        return await _reweight(request, state, engine)
    finally:
        state.leave()


async def _reweight(request: Request, state: ServerState, engine: Any) -> Response:
    t0 = time.perf_counter()
    s = state.settings
    deadline = time.monotonic() + s.request_timeout_s
    raw = await _read_body(request)
    if len(raw) > INLINE_PARSE_BYTES:  # big bodies: JSON, validation, base64 and hashing off the event loop
        parsed = await asyncio.to_thread(_parse_and_check, state, engine, raw)
    else:
        parsed = _parse_and_check(state, engine, raw)
    groups, raw_groups, config, per_group, arrived, bad, key, wire = parsed

    # ------------------------------------------------------------ idempotency
    owner: Optional[asyncio.Future] = None
    if key is not None:
        while True:
            stored = await state.caches.aget("result", key)
            if stored is not None:
                return Response(stored, media_type="application/json", headers={"X-Kawhi-Cache": "hit"})
            running = state.inflight.get(key)
            if running is None:
                owner = asyncio.get_running_loop().create_future()
                state.inflight[key] = owner
                break
            try:
                body = await asyncio.wait_for(asyncio.shield(running), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ProblemError(504, "timeout", f"no answer within {s.request_timeout_s} s", "") from None
            if body is not None:
                return Response(body, media_type="application/json", headers={"X-Kawhi-Cache": "joined"})
            # the first attempt failed: try again ourselves

    body_out: Optional[bytes] = None
    try:
        body_out, cacheable = await _compute(state, engine, config, per_group, groups, raw_groups, arrived, bad,
                                             deadline, t0, wire)
        if key is not None and cacheable:
            await state.caches.aset("result", key, body_out)
        return Response(body_out, media_type="application/json", headers={"X-Kawhi-Cache": "miss"})
    finally:
        if owner is not None:
            state.inflight.pop(key, None)  # type: ignore[arg-type]
            if not owner.done():
                owner.set_result(body_out)


async def _compute(
    state: ServerState, engine: Any, config: Any, per_group: bool, groups: list[Optional[RolloutGroup]],
    raw_groups: Any, arrived: list[_Arrived], bad: dict[int, ProblemError], deadline: float, t0: float,
    wire: WireFormat = WireFormat(),
) -> tuple[bytes, bool]:
    s = state.settings
    batcher = state.batcher
    assert batcher is not None
    try:
        ticket = batcher.reserve(len(arrived))
    except QueueFull as exc:
        raise ProblemError(
            429, "queue-full", f"{exc.pending} groups are waiting (capacity {exc.capacity}); retry later", "",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    results: dict[int, GroupResult] = {}

    async def run_groups() -> int:
        # images referenced by hash
        images: dict[str, bytes] = {}
        ready: list[_Arrived] = []
        for a in arrived:
            if a.data is None and a.sha not in images:
                data = await state.caches.aget("image", a.sha)
                if data is None:
                    err = ProblemError(
                        404, "image-not-found",
                        f"no image with sha256 {a.sha} is held; send its bytes (image.data) or POST /v1/images",
                        pointer("groups", a.index, "image", "sha256"), sha256=a.sha,
                    )
                    if not per_group:
                        raise err
                    bad[a.index] = err
                    continue
                images[a.sha] = data
            ready.append(a)
        loop = asyncio.get_running_loop()
        prepared, errors = await loop.run_in_executor(
            state.prepare_pool, _prepare_all, state, engine, config, ready, images, per_group, ticket
        )
        if errors and not per_group:
            raise errors[min(errors)]
        bad.update(errors)
        tokens = sum(p.num_tokens for p in prepared)
        if tokens > s.max_request_tokens:
            raise ProblemError(
                413, "too-large", f"the request needs {tokens} tokens; the limit is {s.max_request_tokens}",
                "/groups",
            )
        ticket.release(ticket.held - len(prepared))  # slots of groups that failed go back now
        futures = batcher.submit(ticket, prepared)
        done = await asyncio.gather(*futures)
        for p, res in zip(prepared, done):
            if res.error is not None:
                prob = res.error
                err = ProblemError(
                    prob.status or 500, "internal", prob.detail or "the forward failed",
                    pointer("groups", p.index) + (prob.pointer or ""), title=prob.title,
                )
                if not per_group:
                    raise err
                bad[p.index] = err
            else:
                results[p.index] = res
        return tokens

    try:
        # wait_for, not asyncio.timeout: the package supports Python 3.10
        tokens = await asyncio.wait_for(run_groups(), timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        ticket.cancel()
        raise ProblemError(504, "timeout", f"no answer within {s.request_timeout_s} s", "") from None
    except BaseException:
        ticket.cancel()
        raise
    ticket.release()

    out: list[GroupResult] = []
    for i, group in enumerate(groups):
        if i in bad:
            state.count_error(bad[i])
            raw = raw_groups[i] if isinstance(raw_groups, list) and i < len(raw_groups) else None
            out.append(_error_result(group, raw, bad[i]))
        else:
            out.append(results[i])
    response = ReweightResponse(
        model=engine.model_name,
        version=__version__,
        options=config.to_dict(),
        usage=Usage(tokens=tokens, milliseconds=round((time.perf_counter() - t0) * 1000, 3)),
        results=out,
    )
    if tokens > INLINE_SERIALIZE_TOKENS:
        data = await asyncio.to_thread(encode_answer, response, wire)
    else:
        data = encode_answer(response, wire)
    return data, not bad
