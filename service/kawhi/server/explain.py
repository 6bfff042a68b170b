"""``POST /v1/explain``: the explain view of one group, as image/png or text/html.

The body is a /v1/reweight body with exactly one group. It takes the same road as a
reweight (parse and arrival checks, admission, prepare thread, batcher) with the
prepared group marked ``explain`` so the engine also returns each visual token's
alignment; the picture is drawn in a worker thread by kawhi_client.explain, the one
renderer every front end uses. Query: ``heatmap=R`` draws the alignment with response
R (0-based); ``page=N`` picks a PNG page (the answer's ``X-Kawhi-Pages`` says how many).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional

from fastapi import Depends, Request
from starlette.responses import Response

from kawhi.server.app import ServerState, get_state
from kawhi.server.batcher import QueueFull
from kawhi.server.problems import ProblemError, from_group_error, pointer
from kawhi.server.routes import INLINE_PARSE_BYTES, _parse_and_check, _read_body, v1

__all__ = ["choose_media_type", "explain"]

PNG, HTML = "image/png", "text/html"


def choose_media_type(accept: Optional[str]) -> Optional[str]:
    """image/png or text/html by the Accept header (PNG when both rank equal or none is
    named); None when the caller accepts neither."""
    if not accept or not accept.strip():
        return PNG
    quality = {}
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        quality[media] = max(q, quality.get(media, 0.0))

    def q_of(media: str) -> float:
        kind = media.split("/")[0]
        return max(quality.get(media, 0.0), quality.get(f"{kind}/*", 0.0) * 0.999, quality.get("*/*", 0.0) * 0.998)

    png, html = q_of(PNG), q_of(HTML)
    if png <= 0 and html <= 0:
        return None
    return HTML if html > png else PNG


def _query_int(request: Request, name: str, minimum: int) -> Optional[int]:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ProblemError(422, "validation", f"query parameter {name} must be an integer >= {minimum}, got {raw!r}",
                           None)
    return value


@v1.post(
    "/explain",
    tags=["v1"],
    summary="the explain view (PNG or HTML) of one rollout group; body as /v1/reweight",
    response_class=Response,
    responses={200: {"content": {PNG: {}, HTML: {}}, "description": "the picture"},
               406: {"description": "Accept names neither image/png nor text/html"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReweightRequest"}}},
        }
    },
)
async def explain(request: Request, state: ServerState = Depends(get_state)) -> Response:
    media = choose_media_type(request.headers.get("accept"))
    if media is None:
        raise ProblemError(406, "not-acceptable", f"this endpoint answers {PNG} or {HTML}", None)
    heatmap = _query_int(request, "heatmap", 0)
    page = _query_int(request, "page", 1) or 1
    engine = state.require_engine()
    state.enter()
    try:
        return await _explain(request, state, engine, media, heatmap, page)
    finally:
        state.leave()


async def _explain(request: Request, state: ServerState, engine: Any, media: str, heatmap: Optional[int],
                   page: int) -> Response:
    deadline = time.monotonic() + state.settings.request_timeout_s
    raw = await _read_body(request)
    if len(raw) > INLINE_PARSE_BYTES:
        parsed = await asyncio.to_thread(_parse_and_check, state, engine, raw)
    else:
        parsed = _parse_and_check(state, engine, raw)
    groups, _raw_groups, config, _per_group, arrived, bad, _key = parsed
    if len(groups) != 1:
        raise ProblemError(422, "validation", f"explain draws exactly one group, got {len(groups)}; "
                           "send one request per group", "/groups")
    if bad:
        raise bad[0]
    arrival = arrived[0]
    if heatmap is not None and heatmap >= len(arrival.group.responses):
        raise ProblemError(422, "validation", f"heatmap={heatmap} but the group has {len(arrival.group.responses)} "
                           "responses (0-based)", None)
    data = arrival.data if arrival.data is not None else await state.caches.aget("image", arrival.sha)
    if data is None:
        raise ProblemError(404, "image-not-found", f"no image with sha256 {arrival.sha} is held; send its bytes "
                           "(image.data) or POST /v1/images", pointer("groups", 0, "image", "sha256"),
                           sha256=arrival.sha)
    try:
        ticket = state.batcher.reserve(1)
    except QueueFull as exc:
        raise ProblemError(429, "queue-full", f"{exc.pending} groups are waiting (capacity {exc.capacity}); "
                           "retry later", "", headers={"Retry-After": str(exc.retry_after)}) from None
    loop = asyncio.get_running_loop()
    try:
        prepared, image = await loop.run_in_executor(state.prepare_pool, _prepare, state, engine, config, arrival,
                                                     data)
        future = state.batcher.submit(ticket, [prepared])[0]
        result = await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        ticket.cancel()
        raise ProblemError(504, "timeout", f"no answer within {state.settings.request_timeout_s} s", "") from None
    except BaseException:
        ticket.cancel()
        raise
    ticket.release()
    if result.error is not None:
        raise ProblemError(result.error.status or 500, "internal", result.error.detail or "the forward failed",
                           pointer("groups", 0) + (result.error.pointer or ""), title=result.error.title)
    body, pages = await asyncio.to_thread(_draw, engine, arrival.group, result, image, media, heatmap, page)
    return Response(body, media_type=media + ("; charset=utf-8" if media == HTML else ""),
                    headers={"X-Kawhi-Pages": str(pages)})


def _prepare(state: ServerState, engine: Any, config: Any, arrival: Any, data: bytes) -> tuple[Any, Any]:
    """Runs in the prepare thread: decode, Engine.prepare, marked for explaining."""
    from kawhi.engine.errors import GroupError
    from kawhi.engine.images import decode_image

    try:
        image = decode_image(data, state.image_limits, f"/image/{arrival.image_field}")
        if arrival.data is not None:
            state.caches.set("image", arrival.sha, arrival.data)
        prepared = engine.prepare(arrival.group, config, image, image_sha256=arrival.sha, index=0,
                                  region_cache=state.region_cache)
    except GroupError as exc:
        raise from_group_error(exc, pointer("groups", 0)) from None
    if prepared.num_tokens > state.settings.batch_tokens:
        raise ProblemError(413, "too-large", f"the group needs {prepared.num_tokens} tokens; one forward holds at "
                           f"most {state.settings.batch_tokens}", pointer("groups", 0))
    prepared.explain = True
    return prepared, image


def _draw(engine: Any, group: Any, result: Any, image: Any, media: str, heatmap: Optional[int],
          page: int) -> tuple[bytes, int]:
    from kawhi.engine.explain import explanation_for

    view = explanation_for(engine, group, result, image, heatmap_response=heatmap)
    if media == HTML:
        return view.html().encode("utf-8"), 1
    pages = view.pages()
    if page > len(pages):
        raise ProblemError(422, "validation", f"page={page} but the view has {len(pages)} page(s)", None)
    from kawhi_client.explain import png_bytes

    return png_bytes(pages[page - 1]), len(pages)
