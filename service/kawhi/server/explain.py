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
from typing import Any

from fastapi import Depends, Request
from starlette.responses import Response

from kawhi.errors import KawhiError
from kawhi.pipeline import Pipeline, outcome
from kawhi.server.reweight import INLINE_PARSE_BYTES, parse_and_admit, read_body, reserve
from kawhi.server.routes import v1
from kawhi.server.state import ServerState, get_state

__all__ = ["choose_media_type", "explain"]

PNG, HTML = "image/png", "text/html"


def choose_media_type(accept: str | None) -> str | None:
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


def _query_int(request: Request, name: str, minimum: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise KawhiError("validation", f"query parameter {name} must be an integer >= {minimum}")
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
        raise KawhiError("not-acceptable", f"this endpoint answers {PNG} or {HTML}")
    heatmap = _query_int(request, "heatmap", 0)
    page = _query_int(request, "page", 1) or 1
    pipeline = state.pipeline()  # 503 while loading or draining
    state.enter()
    try:
        return await _explain(request, state, pipeline, media, heatmap, page)
    finally:
        state.leave()


async def _explain(request: Request, state: ServerState, pipeline: Pipeline, media: str, heatmap: int | None,
                   page: int) -> Response:
    deadline = time.monotonic() + state.settings.request_timeout_s
    body = await read_body(request, state.settings.body_timeout_s)
    ctype = request.headers.get("content-type", "")
    if len(body) > INLINE_PARSE_BYTES:
        admission = await asyncio.to_thread(parse_and_admit, state, pipeline, body, ctype)
    else:
        admission = parse_and_admit(state, pipeline, body, ctype)
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
    data = admitted.data if admitted.data is not None else await state.caches.aget("image", admitted.sha256)
    ticket = reserve(state.batcher, 1)
    loop = asyncio.get_running_loop()
    try:
        prepared = await loop.run_in_executor(state.prepare_pool, _prepare, pipeline, admission, data)
        future = state.batcher.submit(ticket, [prepared])[0]
        result = await asyncio.wait_for(future, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        ticket.cancel("timeout")
        raise KawhiError("timeout", f"no answer within {state.settings.request_timeout_s:g} s") from None
    except KawhiError as exc:
        ticket.cancel("error")
        raise exc.placed(parsed.prefix(0)) from None
    except BaseException:
        ticket.cancel("error")
        raise
    ticket.release()
    checked = outcome(result)
    if isinstance(checked, KawhiError):
        raise checked.placed(parsed.prefix(0))
    image = _decode(data, state)
    body_out, pages = await asyncio.to_thread(_draw, pipeline.engine, admitted.group, result, image, media,
                                              heatmap, page, admission.config)
    return Response(body_out, media_type=media + ("; charset=utf-8" if media == HTML else ""),
                    headers={"X-Kawhi-Pages": str(pages)})


def _prepare(pipeline: Pipeline, admission: Any, data: bytes | None) -> Any:
    """Runs in the prepare thread: the pipeline's prepare, marked for explaining."""
    prepared = pipeline.prepare(admission.groups[0], admission.config, data)
    prepared.explain = True
    return prepared


def _decode(data: bytes | None, state: ServerState) -> Any:
    """The group's image, decoded again for drawing (the prepared group keeps only its tensors)."""
    from kawhi.engine.images import decode_image

    return decode_image(data, state.image_limits)


def _draw(engine: Any, group: Any, result: Any, image: Any, media: str, heatmap: int | None,
          page: int, config: Any = None) -> tuple[bytes, int]:
    from kawhi.engine.explain import explanation_for

    view = explanation_for(engine, group, result, image, heatmap_response=heatmap, config=config)
    if media == HTML:
        return view.html().encode("utf-8"), 1
    pages = view.pages()
    if page > len(pages):
        raise KawhiError("validation", f"page={page} but the view has {len(pages)} page(s)")
    from kawhi_client.explain import png_bytes

    return png_bytes(pages[page - 1]), len(pages)
