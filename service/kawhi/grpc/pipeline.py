"""The calls the gRPC servicer makes into the request pipeline (the one place to switch).

Each takes the wire object an HTTP body parses to and does what the HTTP route does,
with the same steps (kawhi.pipeline: parse -> admit -> prepare -> run -> assemble,
through ``kawhi.server.reweight``'s idempotency key, admission and batcher) and the
same ``KawhiError``s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from kawhi.errors import KawhiError
from kawhi.server import reweight as http_reweight
from kawhi.server.state import ServerState

# Documents with more groups than this are parsed and admitted in a worker thread.
INLINE_PARSE_GROUPS = 8


def _parse_and_admit(state: ServerState, pipeline: Any, doc: dict[str, Any]) -> Any:
    parsed = pipeline.parse_document(doc)
    return pipeline.admit(parsed, queue_capacity=state.settings.queue_groups, allow_paths=False)


async def reweight(state: ServerState, doc: dict[str, Any], timeout_s: float | None) -> bytes:
    """``POST /v1/reweight`` for a request document: the JSON answer (as the idempotent result
    cache holds it). ``timeout_s`` (the caller's deadline) tightens the server's own
    per-request deadline. Cancelling the await drops the request's queued groups (the
    batcher ticket is cancelled)."""
    pipeline = state.pipeline()  # 503 while loading or draining
    started = time.perf_counter()
    s = state.settings
    limit = s.request_timeout_s if timeout_s is None else min(timeout_s, s.request_timeout_s)
    deadline = time.monotonic() + limit
    if len(doc.get("groups") or ()) > INLINE_PARSE_GROUPS:
        admission = await asyncio.to_thread(_parse_and_admit, state, pipeline, doc)
    else:
        admission = _parse_and_admit(state, pipeline, doc)
    key = http_reweight.idempotency_key(pipeline, admission) if not admission.errors else None

    out, _ = await http_reweight.answer_once(
        state, key, deadline, limit,
        lambda: _unless_drain_expires(state, http_reweight._compute(state, pipeline, admission, deadline, started)))
    return out


async def _unless_drain_expires(state: ServerState, work: Any) -> Any:
    """``work``, unless the drain deadline comes first: then its queued groups are dropped and
    the caller gets the draining 503 (UNAVAILABLE + RetryInfo), as over HTTP."""
    task = asyncio.ensure_future(work)
    expired = asyncio.ensure_future(state.drain_expired.wait())
    try:
        await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the caller went away: the work's cancellation drops its groups
        task.cancel()
        raise
    finally:
        expired.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # the cancellation (or what the work raised meanwhile) ends here
        pass
    raise KawhiError("draining", "the server is shutting down and this request could not finish in time; "
                     "retry on another replica", headers={"Retry-After": "1"})


async def info(state: ServerState) -> dict[str, Any]:
    """``GET /v1/info``."""
    from kawhi.server import routes

    response = await routes.info(state)
    return json.loads(response.body)


async def store_image(state: ServerState, data: bytes) -> dict[str, Any]:
    """``POST /v1/images`` with raw bytes: {sha256, bytes, width, height}."""
    from kawhi.engine.images import decode_image, sha256_hex

    if state.draining:
        state.require_engine()  # raises the draining 503
    if not data:
        raise KawhiError("invalid-image", "the body holds no image bytes", "")
    loop = asyncio.get_running_loop()
    image = await loop.run_in_executor(state.prepare_pool, decode_image, data, state.image_limits, "")
    sha = sha256_hex(data)
    await state.caches.aset("image", sha, data)
    return {"sha256": sha, "bytes": len(data), "width": image.width, "height": image.height}
