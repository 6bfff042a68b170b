"""``POST /v1/reweight`` over the pipeline (kawhi.pipeline), with what HTTP adds to it.

1. the body, read under ``body_timeout_s`` (408 for a stalled client), then the
   pipeline's parse and admit (no model work; off the event loop for big bodies);
2. the idempotency key (canonical groups with images by hash + resolved options +
   model + tokenizer + version): a stored answer is returned as is, and a retry that
   arrives while the first attempt still runs waits for it;
3. admission against the queue (429 + Retry-After), images referenced by hash from
   the cache, the pipeline's prepare in the prepare thread, the batcher's forward,
   the pipeline's assembly -- all under the request deadline (504);
4. meanwhile the connection is watched: a client that goes away has its queued
   groups dropped (``kawhi_queue_dropped_total{reason="client-closed"}``), one log
   line, no traceback; a drain that reaches its deadline answers 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from kawhi import __version__
from kawhi.errors import KawhiError
from kawhi.pipeline import Admission, Pipeline, outcome
from kawhi.server.batcher import QueueFull
from kawhi.server.encoding import encode_answer, wire_of
from kawhi.server.state import ServerState

log = logging.getLogger("kawhi.server")

# Bodies larger than this are parsed in a worker thread rather than on the event loop.
INLINE_PARSE_BYTES = 256 * 1024
# Answers covering more tokens than this are serialised in a worker thread.
INLINE_SERIALIZE_TOKENS = 16384


class ClientClosed(Exception):
    """The client went away before its answer was ready."""


async def read_body(request: Request, timeout_s: float) -> bytes:
    """The whole body, or 408 when the client does not send it within ``timeout_s``."""
    try:
        return await asyncio.wait_for(request.body(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise KawhiError("request-timeout", f"the request body did not arrive within {timeout_s:g} s") from None


async def wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


def parse_and_admit(state: ServerState, pipeline: Pipeline, body: bytes, content_type: str | None) -> Admission:
    """Pure CPU, thread-safe: the pipeline's parse and admit steps."""
    parsed = pipeline.parse_body(body, content_type)
    return pipeline.admit(parsed, queue_capacity=state.settings.queue_groups, allow_paths=False)


def idempotency_key(pipeline: Pipeline, admission: Admission) -> str:
    groups = []
    for a in admission.groups:
        g = a.group.model_dump(mode="python")
        g["image"] = {"sha256": a.sha256}
        groups.append(g)
    canonical = {
        "v": 2, "version": __version__, "model": pipeline.engine.model_name,
        "tokenizer": pipeline.engine.tokenizer_fingerprint, "options": admission.config.to_dict(),
        "per_group_errors": admission.parsed.per_group_errors, "groups": groups,
    }
    wire = wire_of(admission.parsed)
    if not wire.is_default:  # a stored answer is stored in the encoding it was asked in
        canonical["wire"] = [wire.encoding_format, wire.token_arrays]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


async def handle(request: Request, state: ServerState, pipeline: Pipeline) -> Response:
    started = time.perf_counter()
    s = state.settings
    deadline = time.monotonic() + s.request_timeout_s
    body = await read_body(request, s.body_timeout_s)
    ctype = request.headers.get("content-type", "")  # missing -> 415, like a wrong one
    if len(body) > INLINE_PARSE_BYTES:  # JSON, validation, base64 and hashing off the event loop
        admission = await asyncio.to_thread(parse_and_admit, state, pipeline, body, ctype)
    else:
        admission = parse_and_admit(state, pipeline, body, ctype)
    key = idempotency_key(pipeline, admission) if not admission.errors else None

    try:
        out, source = await answer_once(
            state, key, deadline, s.request_timeout_s,
            lambda: _watched(request, state, _compute(state, pipeline, admission, deadline, started)))
    except ClientClosed:
        return Response(status_code=499)  # nobody reads it; the access log and metrics record 499
    return Response(out, media_type="application/json", headers={"X-Kawhi-Cache": source})


def reserve(batcher: Any, n: int) -> Any:
    """``n`` places in the batcher's queue (a Ticket), or the queue-full 429 with Retry-After."""
    try:
        return batcher.reserve(n)
    except QueueFull as exc:
        raise KawhiError("queue-full", f"{exc.pending} groups are waiting (capacity {exc.capacity}); retry later",
                         headers={"Retry-After": str(exc.retry_after)}) from None


async def answer_once(state: ServerState, key: str | None, deadline: float, limit_s: float,
                      compute: Callable[[], Awaitable[tuple[bytes, bool]]]) -> tuple[bytes, str]:
    """The answer of a request with idempotency ``key`` (None: not idempotent) and where it
    came from: stored (``"hit"``), the same request's attempt in flight (``"joined"``), or
    ``compute()`` (``"miss"``, stored when it says it is cacheable). A retry that arrives
    while the first attempt runs waits for it; if that attempt fails, it computes itself.
    Every front end (HTTP, gRPC) answers through here."""
    owner: asyncio.Future | None = None
    if key is not None:
        while True:
            stored = await state.caches.aget("result", key)
            if stored is not None:
                return stored, "hit"
            running = state.inflight.get(key)
            if running is None:
                owner = asyncio.get_running_loop().create_future()
                state.inflight[key] = owner
                break
            try:
                done = await asyncio.wait_for(asyncio.shield(running), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise KawhiError("timeout", f"no answer within {limit_s:g} s") from None
            if done is not None:
                return done, "joined"
            # the first attempt failed: try again ourselves
    out: bytes | None = None
    try:
        out, cacheable = await compute()
        if key is not None and cacheable:
            await state.caches.aset("result", key, out)
        return out, "miss"
    finally:
        if owner is not None:
            state.inflight.pop(key, None)  # type: ignore[arg-type]
            if not owner.done():
                owner.set_result(out)


async def _watched(request: Request, state: ServerState, work: Any) -> Any:
    """``work`` unless the client disconnects (ClientClosed) or the drain deadline comes (503)."""
    task = asyncio.ensure_future(work)
    watchers = {asyncio.ensure_future(wait_disconnect(request)): "client", asyncio.ensure_future(state.drain_expired.wait()): "drain"}
    try:
        done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in watchers:
            w.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # the cancellation (or whatever the work raised meanwhile) ends here
        pass
    reason = next(watchers[w] for w in done if w in watchers)
    if reason == "drain":
        raise KawhiError("draining", "the server is shutting down and this request could not finish in time; "
                         "retry on another replica", headers={"Retry-After": "1"})
    state.metrics.errors.labels("client-closed").inc()
    log.info("client closed the request; its queued groups were dropped")
    raise ClientClosed()


async def _compute(state: ServerState, pipeline: Pipeline, admission: Admission, deadline: float,
                   started: float) -> tuple[bytes, bool]:
    s = state.settings
    batcher = state.batcher
    assert batcher is not None
    ticket = reserve(batcher, len(admission.groups))
    outcomes: dict[int, Any] = {}
    tokens = 0

    async def run_groups() -> None:
        nonlocal tokens
        images: dict[str, bytes] = {}
        for a in admission.groups:
            if a.data is None and a.sha256 not in images:
                data = await state.caches.aget("image", a.sha256)
                if data is not None:
                    images[a.sha256] = data
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        prepared = await loop.run_in_executor(
            state.prepare_pool, lambda: pipeline.prepare_all(admission, images, cancelled=lambda: ticket.cancelled))
        state.metrics.prepare_seconds.observe(time.perf_counter() - t0)
        for a in admission.groups:
            if a.data is not None:
                state.caches.set("image", a.sha256, a.data)  # later requests may send just the hash
        tokens = pipeline.check_request_tokens(prepared)
        ticket.release(ticket.held - len(prepared))  # slots of groups that failed go back now
        results = await asyncio.gather(*batcher.submit(ticket, prepared))
        for p, result in zip(prepared, results):
            outcomes[p.index] = outcome(result)

    try:
        # wait_for, not asyncio.timeout: the package supports Python 3.10
        await asyncio.wait_for(run_groups(), timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        ticket.cancel("timeout")
        raise KawhiError("timeout", f"no answer within {s.request_timeout_s:g} s") from None
    except asyncio.CancelledError:
        ticket.cancel("client-closed")
        raise
    except BaseException:
        ticket.cancel("error")
        raise
    ticket.release()
    for err in admission.errors.values():
        state.count_error(err)
    response = pipeline.assemble(admission, outcomes, tokens, started)
    for i, res in enumerate(response.results):
        if res.error is not None and i not in admission.errors:
            state.metrics.errors.labels(res.error.type.rsplit("/", 1)[-1]).inc()
    wire = wire_of(admission.parsed)
    if tokens > INLINE_SERIALIZE_TOKENS:
        data = await asyncio.to_thread(encode_answer, response, wire)
    else:
        data = encode_answer(response, wire)
    return data, not admission.errors and all(r.error is None for r in response.results)
