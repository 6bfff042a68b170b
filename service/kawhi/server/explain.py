"""``POST /v1/explain``: the explain view of one group, as image/png or text/html.

The body is a /v1/reweight body with exactly one group. It takes the same road as a
reweight through the serving core (``ReweightService.explain``: admission, queue,
deadline, disconnect and drain watch), with the prepared group marked ``explain`` so
the engine also returns each visual token's alignment; the picture is drawn in a
worker thread by kawhi_client.explain, the one renderer every front end uses. Query: ``heatmap=R`` draws the alignment with response
R (0-based); ``page=N`` picks a PNG page (the answer's ``X-Kawhi-Pages`` says how many).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Depends, Request
from starlette.responses import Response

from kawhi.errors import KawhiError
from kawhi.pipeline.explain import most_pages
from kawhi.pipeline.service import ReweightService
from kawhi.server.routes import caller_timeout, disconnect_watch, get_service, read_body, v1

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
async def explain(request: Request, state: ReweightService = Depends(get_service)) -> Response:
    media = choose_media_type(request.headers.get("accept"))
    if media is None:
        raise KawhiError("not-acceptable", f"this endpoint answers {PNG} or {HTML}")
    heatmap = _query_int(request, "heatmap", 0)
    page = _query_int(request, "page", 1) or 1
    state.require_engine()  # 503 while loading or draining
    deadline = state.deadline(caller_timeout(request))
    state.enter()
    try:
        body = await read_body(request, state.settings.body_timeout_s)
        admission = await state.admit_body(body, request.headers.get("content-type", ""))
        _check_page(state, admission, media, page)
        view = await state.explain(admission, deadline, heatmap=heatmap, client_gone=disconnect_watch(request))
        body_out, pages = await asyncio.to_thread(_draw, view, media, page)
        return Response(body_out, media_type=media + ("; charset=utf-8" if media == HTML else ""),
                        headers={"X-Kawhi-Pages": str(pages)})
    finally:
        state.leave()


def _check_page(state: ReweightService, admission: Any, media: str, page: int) -> None:
    """Refuse, before the computation, a page the view cannot have: any but 1 for HTML (one
    document), one past the most a PNG view of this group could fill. A page within that
    bound but past the pages drawn is refused after drawing (the count depends on the weights)."""
    if page == 1:
        return
    if media == HTML:
        raise KawhiError("validation", f"page={page} but the text/html view is one document; page is for image/png")
    groups = admission.parsed.groups
    group = groups[0] if len(groups) == 1 else None
    if group is not None:  # otherwise the service refuses the request
        bound = most_pages(state.pipeline().engine, group, admission.config)
        if page > bound:
            raise KawhiError("validation", f"page={page} but this group's view has at most {bound} page(s)")


def _draw(view: Any, media: str, page: int) -> tuple[bytes, int]:
    """The picture of an explain view in the media type asked for (a worker thread)."""
    if media == HTML:
        return view.html().encode("utf-8"), 1
    pages = view.pages()
    if page > len(pages):
        raise KawhiError("validation", f"page={page} but the view has {len(pages)} page(s)")
    from kawhi_client.explain import png_bytes

    return png_bytes(pages[page - 1]), len(pages)
