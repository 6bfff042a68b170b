"""The calls the gRPC servicer makes into the request pipeline (one place to switch).

Each takes the wire object an HTTP body parses to and answers what the HTTP route
answers, raising the same ``ProblemError``s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

from kawhi_client.schema import ReweightResponse

from kawhi.server.app import ServerState
from kawhi.server.problems import ProblemError


async def reweight(state: ServerState, body: dict[str, Any], timeout_s: Optional[float]) -> ReweightResponse:
    """``POST /v1/reweight`` for a body object; ``timeout_s`` (the caller's deadline) tightens
    the server's own per-request deadline."""
    from kawhi.server import routes

    engine = state.require_engine()
    t0 = time.perf_counter()
    limit = state.settings.request_timeout_s if timeout_s is None else min(timeout_s, state.settings.request_timeout_s)
    deadline = time.monotonic() + limit
    raw = json.dumps(body, allow_nan=True, separators=(",", ":")).encode()
    parsed = await asyncio.to_thread(routes._parse_and_check, state, engine, raw)
    groups, raw_groups, config, per_group, arrived, bad, _key = parsed
    data, _cacheable = await routes._compute(
        state, engine, config, per_group, groups, raw_groups, arrived, bad, deadline, t0
    )
    return ReweightResponse.model_validate_json(data)


async def info(state: ServerState) -> dict[str, Any]:
    """``GET /v1/info``."""
    from kawhi.server import routes

    response = await routes.info(state)
    return json.loads(response.body)


async def store_image(state: ServerState, data: bytes) -> dict[str, Any]:
    """``POST /v1/images`` with raw bytes: {sha256, bytes, width, height}."""
    from kawhi.engine.errors import GroupError
    from kawhi.engine.images import decode_image, sha256_hex
    from kawhi.server.problems import from_group_error

    if state.draining:
        state.require_engine()  # raises the draining 503
    if not data:
        raise ProblemError(422, "invalid-image", "the body holds no image bytes", "")
    limit = state.settings.max_image_bytes
    if len(data) > limit:
        raise ProblemError(413, "too-large", f"image is {len(data)} bytes; the limit is {limit}", "")
    loop = asyncio.get_running_loop()
    try:
        image = await loop.run_in_executor(state.prepare_pool, decode_image, data, state.image_limits, "")
    except GroupError as exc:
        raise from_group_error(exc, "") from None
    sha = sha256_hex(data)
    await state.caches.aset("image", sha, data)
    return {"sha256": sha, "bytes": len(data), "width": image.width, "height": image.height}
