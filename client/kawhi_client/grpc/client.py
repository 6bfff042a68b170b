"""``GrpcClient``: the KAWHI service over gRPC (kawhi.v1.Kawhi), with ``Client``'s methods,
results and retry policy.

    from kawhi_client import GrpcClient
    with GrpcClient("kawhi:50051") as kawhi:
        results = kawhi.reweight(groups)           # list[GroupResult], input order

The request planning is ``Client``'s own (``kawhi_client.planning``: local checks,
images uploaded once and sent by hash, packing under the server's limits, pointers
rewritten to the caller's list, results merged in input order) and so are the
``RetryPolicy``, ``Timeouts``, ``Limits`` and the typed errors. What differs is the
transport: a call that fails is retried when its status is transient — UNAVAILABLE
(loading, draining, or a transport failure), RESOURCE_EXHAUSTED *with* RetryInfo
(queue full; the delay is honoured like Retry-After) and DEADLINE_EXCEEDED (like a
504 or a read timeout over HTTP) — and nothing else is. RESOURCE_EXHAUSTED without
RetryInfo is a size limit (413): a request of several groups is split in two.

``reweight_stream`` sends groups one per message on ``ReweightStream`` and yields
``(index, GroupResult)`` as each finishes (any order). A stream is not retried.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from kawhi_client.config import (
    DEFAULT_READY_TIMEOUT_S,
    READY_LOG_EVERY_S,
    READY_LOG_FIRST_S,
    ClientStats,
    Limits,
    RetryPolicy,
    Timeouts,
    ready_timeout,
    retry_policy,
    unreachable_grace,
)
from kawhi_client.errors import (
    ImageNotFound,
    InvalidRequest,
    KawhiConnectionError,
    KawhiError,
    KawhiHTTPError,
    KawhiTimeout,
    PayloadTooLarge,
    ProtocolError,
    ServerNotReady,
    client_problem,
    error_class,
)
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc._proto import kawhi_pb2_grpc as pb_grpc
from kawhi_client.grpc.status import problem_from_status, retry_delay, unpack_details
from kawhi_client.images import HeldImages, ImageInputError, LoadedImage, load_image
from kawhi_client.planning import (
    GroupLike,
    OptionsLike,
    PreparedGroup,
    merge_responses,
    new_request_id,
    options_json,
    plan_chunks,
    prepare_groups,
    remap_error,
    remap_problem,
    sha_at,
)
from kawhi_client.routing import GRPC_METADATA_KEY, request_routing_key
from kawhi_client.schema import GroupResult, ReweightResponse

log = logging.getLogger("kawhi_client")

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = "kawhi.v1.Kawhi"
IMAGE_CHUNK_BYTES = 1024 * 1024
IMAGE_TIMEOUT_TOKENS = 1280  # an upload gets the read timeout of this many tokens
_TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL)


class GrpcClient:
    """Synchronous gRPC client of the KAWHI service (thread-safe; a context manager).

    Args:
        target: ``host:port`` of the gRPC front end (default ``$KAWHI_GRPC_TARGET`` or
            ``127.0.0.1:50051``).
        api_key: bearer key, sent as ``authorization`` metadata (default ``$KAWHI_API_KEY``).
        credentials: ``grpc.ChannelCredentials`` for TLS (default: plaintext).
        timeout, timeout_per_token, connect_timeout, max_in_flight, retries, backoff,
        wait_ready, max_groups_per_request: as ``Client`` (the deadline of a call is
            ``timeout + timeout_per_token * estimated tokens``).
        metadata: extra metadata on every call.
        options: extra channel options.
    """

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        timeout_per_token: float = 0.002,
        connect_timeout: float = 10.0,
        max_in_flight: int = 4,
        retries: int | RetryPolicy | None = 5,
        backoff: float = 0.5,
        wait_ready: bool | float = True,
        max_groups_per_request: int | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        rng: Any = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.target = target or os.environ.get("KAWHI_GRPC_TARGET") or DEFAULT_TARGET
        key = api_key if api_key is not None else os.environ.get("KAWHI_API_KEY")
        self._metadata = list(metadata or ())
        if key:
            self._metadata.append(("authorization", f"Bearer {key}"))
        self.timeouts = Timeouts(base=timeout, per_token=timeout_per_token, connect=connect_timeout)
        self.retry_policy = retry_policy(retries, backoff)
        self.max_in_flight = max_in_flight
        self.max_groups_per_request = max_groups_per_request
        self._ready_timeout = ready_timeout(wait_ready)
        self._unreachable_grace = unreachable_grace(wait_ready)
        self._ready = self._ready_timeout is None
        self.stats = ClientStats()
        self.limits: Limits | None = None
        self._info: dict[str, Any] | None = None
        self._known = HeldImages()  # the image hashes this server was sent
        self._rng = rng if rng is not None else random.Random()
        # the server enforces the message limits (the same as over HTTP); the client does not add its own
        channel_options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                           ("grpc.primary_user_agent", "kawhi-client"), *(options or ())]
        if credentials is not None:
            self._channel = grpc.secure_channel(self.target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=channel_options)
        self._stub = pb_grpc.KawhiStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._slots = threading.BoundedSemaphore(max_in_flight)

    # ------------------------------------------------------------------ API
    def reweight(self, groups: Iterable[GroupLike], *, options: OptionsLike = None, per_group_errors: bool = False,
                 request_id: str | None = None, **option_kwargs: Any) -> list[GroupResult]:
        """As ``Client.reweight``: one ``GroupResult`` per group, in input order."""
        return self.reweight_response(groups, options=options, per_group_errors=per_group_errors,
                                      request_id=request_id, **option_kwargs).results

    def reweight_response(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                          per_group_errors: bool = False, request_id: str | None = None,
                          **option_kwargs: Any) -> ReweightResponse:
        """As ``Client.reweight_response``: the whole envelope, usage summed over the calls."""
        groups = list(groups)
        opts = _options(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, per_group_errors)
        info = self.info()
        limits = self.limits or Limits()
        self._upload_missing(images)
        todo, messages = _messages(prepared, failed, per_group_errors)
        runs = plan_chunks(
            [(messages[g.index].ByteSize() + 8, g.tokens) for g in todo],
            max_groups=limits.groups_per_request(self.max_in_flight, self.max_groups_per_request),
            max_bytes=max(1024, limits.max_body_bytes - 1024),
            max_tokens=limits.max_request_tokens,
        )
        prefix = request_id or new_request_id()
        jobs: list[Callable[[], Any]] = []
        for k, run in enumerate(runs):
            rid = prefix if len(runs) == 1 else f"{prefix}.{k}"
            chunk = [todo[p] for p in run]
            jobs.append(lambda chunk=chunk, rid=rid: self._chunk(chunk, messages, opts, per_group_errors, images,
                                                                 rid, set()))
        pieces = [piece for answer in self._parallel(jobs) for piece in answer]
        return merge_responses(len(groups), pieces, failed, info)

    def reweight_stream(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                        request_id: str | None = None, **option_kwargs: Any) -> Iterator[tuple[int, GroupResult]]:
        """Send the groups on one ``ReweightStream`` (one per message, as they are read from
        ``groups``) and yield ``(index, result)`` as each finishes. A bad group is a result
        with ``error`` (always per-group errors), its pointer indexing the caller's list."""
        groups = list(groups)
        opts = _options(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, True)
        self.info()
        self._upload_missing(images)
        for i, result in failed.items():
            yield i, result
        todo = [g for g in prepared if g is not None]
        options_message = convert.options_to_message(opts)

        def requests() -> Iterator[pb.ReweightRequest]:
            for g in todo:
                req = pb.ReweightRequest(groups=[_group_message(g)], per_group_errors=True)
                if options_message is not None:
                    req.options.CopyFrom(options_message)
                yield req

        rid = request_id or new_request_id()
        timeout = self.timeouts.read_timeout(sum(g.tokens for g in todo))
        call = self._stub.ReweightStream(requests(), timeout=timeout, metadata=self._call_metadata(
            rid, request_routing_key([g.route for g in todo])))
        try:
            for item in call:
                g = todo[item.request_index]
                result = convert.group_result_from_message(item.result)
                if result.error is not None:
                    result.error = remap_problem(result.error, [g.index])
                yield g.index, result
        except grpc.RpcError as exc:
            raise self._error(exc, rid, 1) from None
        finally:
            call.cancel()  # a caller that stopped reading: the server drops what is queued

    def upload_image(self, image: Any) -> str:
        """Upload image bytes (or a path / base64 dict) unchanged; returns its sha256."""
        try:
            loaded = load_image(image)
        except ImageInputError as exc:
            raise InvalidRequest(client_problem(exc.detail, "/image" + (f"/{exc.field}" if exc.field else "")),
                                 attempts=0) from exc
        if loaded.data is None:
            raise InvalidRequest(client_problem("upload_image needs the image bytes, not a hash", "/image/sha256"),
                                 attempts=0)
        self._ensure_ready()
        return self._upload(loaded)

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``Info`` (cached after the first call): model, limits, defaults ... as ``Client.info``."""
        if self._info is not None and not refresh:
            return self._info
        self._ensure_ready()
        answer = self._call(self._stub.Info, pb.InfoRequest(), self.timeouts.read_timeout(0))
        self._info = convert.from_struct(answer)
        self.limits = Limits.from_info(self._info)
        return self._info

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until grpc.health.v1 says SERVING; raises ServerNotReady after ``timeout`` s
        (at once if the model failed to load)."""
        limit = self._ready_timeout if timeout is None else timeout
        limit = DEFAULT_READY_TIMEOUT_S if limit is None else float(limit)
        grace = self._unreachable_grace if timeout is None else None  # as Client: a wrong target fails fast
        start = time.monotonic()
        interval, state, reasons = 0.25, "unreachable", []
        answered, next_log = False, READY_LOG_FIRST_S
        while True:
            remaining = limit - (time.monotonic() - start)
            try:
                answer = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                            timeout=max(0.5, min(10.0, remaining)))
                answered = True
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    self._ready = True
                    return {"state": "ready", "reasons": []}
                state, reasons = self._why_not_serving()
                if state == "failed":
                    raise ServerNotReady(f"{self.target} is not ready: failed ({'; '.join(reasons)})",
                                         state=state, reasons=reasons, waited_s=time.monotonic() - start)
            except grpc.RpcError as exc:
                if exc.code() not in _TRANSPORT_CODES:
                    raise ServerNotReady(f"{self.target}: health check answered {exc.code().name}", state=exc.code().name,
                                         reasons=[exc.details() or ""], waited_s=time.monotonic() - start) from None
                state, reasons = "unreachable", [exc.details() or exc.code().name]
            waited = time.monotonic() - start
            if waited >= limit:
                raise ServerNotReady(f"{self.target} not ready after {waited:.1f}s: {state}"
                                     + (f" ({'; '.join(reasons)})" if reasons else ""),
                                     state=state, reasons=reasons, waited_s=waited)
            if not answered and grace is not None and waited >= grace:
                raise ServerNotReady(f"nothing answers at {self.target} ({'; '.join(reasons)}; {waited:.1f}s): check "
                                     "the target, or pass wait_ready=<seconds> to wait for a server that is still starting",
                                     state=state, reasons=reasons, waited_s=waited)
            if waited >= next_log:
                log.warning("kawhi_client: waiting for %s (gRPC health): %s%s (%.0fs of %.0fs)", self.target, state,
                            f" ({'; '.join(reasons)})" if reasons else "", waited, limit)
                next_log = waited + READY_LOG_EVERY_S
            time.sleep(max(0.0, min(interval, limit - waited)))
            interval = min(2.0, interval * 2)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcClient({self.target!r}, max_in_flight={self.max_in_flight})"

    # ------------------------------------------------------------------ one call, retried
    def _call_metadata(self, rid: str, route: str | None = None) -> list[tuple[str, str]]:
        """Metadata of one call: the caller's, the request id and, for a reweight, the routing
        key of its first group (kawhi_client.routing: what replica affinity hashes on)."""
        extra = [(GRPC_METADATA_KEY, route)] if route else []
        return [*self._metadata, ("x-request-id", rid), *extra]

    def _call(self, method: Any, request: Any, timeout: float, request_id: str | None = None,
              route: str | None = None) -> Any:
        """One unary call, retrying transient failures (module doc); the same x-request-id on every attempt."""
        rid = request_id or new_request_id()
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.stats.add(http_requests=1)
            try:
                return method(request, timeout=timeout, metadata=self._call_metadata(rid, route))
            except grpc.RpcError as exc:
                status = rpc_status.from_call(exc)
                ours = "info" in unpack_details(status)
                delay = retry_delay(status)
                if ours:
                    problem = problem_from_status(exc.code(), exc.details() or "", status)
                    transient = problem.status in self.retry_policy.statuses and (
                        problem.status != 429 or delay is not None)
                else:
                    transient = exc.code() in _TRANSPORT_CODES or (
                        exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None)
                wait = None
                if transient:
                    wait = self.retry_policy.delay(attempt, retry_after=delay, elapsed=time.monotonic() - start,
                                                   rng=self._rng)
                if wait is None:
                    raise self._error(exc, rid, attempt) from None
                self.stats.add(retries=1)
                log.info("kawhi: gRPC %s attempt %d failed (%s); retrying in %.2fs [request_id=%s]",
                         getattr(method, "_method", method), attempt, exc.code().name, wait, rid)
                time.sleep(wait)

    def _error(self, exc: grpc.RpcError, rid: str, attempts: int) -> KawhiError:
        """The typed error of a failed call (as ``Client`` raises for the same HTTP status)."""
        status = rpc_status.from_call(exc)
        code, details = exc.code(), exc.details() or ""
        if "info" not in unpack_details(status):
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return KawhiTimeout(f"{self.target}: no answer in time after {attempts} attempt(s) "
                                    f"[request_id={rid}]", request_id=rid, attempts=attempts)
            if code in _TRANSPORT_CODES:
                return KawhiConnectionError(f"{self.target}: {code.name}: {details} after {attempts} attempt(s) "
                                            f"[request_id={rid}]", request_id=rid, attempts=attempts)
        problem = problem_from_status(code, details, status)
        cls = error_class(problem.status, problem)
        return cls(problem, request_id=getattr(problem, "request_id", None) or rid, attempts=attempts,
                   retry_after=retry_delay(status))

    def _why_not_serving(self) -> tuple[str, list[str]]:
        """While health says NOT_SERVING: the phase and reasons, from the Info call's status."""
        try:
            self._stub.Info(pb.InfoRequest(), timeout=5.0, metadata=self._call_metadata(new_request_id()))
            return "ready", []
        except grpc.RpcError as exc:
            problem = problem_from_status(exc.code(), exc.details() or "", rpc_status.from_call(exc))
            slug = problem.type.rsplit("/", 1)[-1]
            return ("failed" if slug == "unavailable" else slug), [problem.detail] if problem.detail else []

    def _ensure_ready(self) -> None:
        if not self._ready:
            self.wait_ready()

    # ------------------------------------------------------------------ images
    def _upload(self, image: LoadedImage, reupload: bool = False) -> str:
        data = image.data
        assert data is not None

        def chunks() -> Iterator[pb.ImageChunk]:
            for at in range(0, len(data), IMAGE_CHUNK_BYTES):
                yield pb.ImageChunk(data=data[at:at + IMAGE_CHUNK_BYTES])

        # a client-streamed call is retried by sending the chunks again (the iterator is made anew)
        answer = self._call(lambda _req, **kw: self._stub.PutImage(chunks(), **kw), None,
                            self.timeouts.read_timeout(IMAGE_TIMEOUT_TOKENS))
        if answer.sha256.lower() != image.sha256:
            raise ProtocolError(f"the server stored the image as {answer.sha256!r}, not {image.sha256}")
        self._known.add(image.sha256)
        self.stats.add(images_uploaded=1, image_bytes_uploaded=len(data), image_reuploads=int(reupload))
        return image.sha256

    def _upload_missing(self, images: Mapping[str, LoadedImage]) -> None:
        missing = [img for sha, img in images.items() if img.data is not None and sha not in self._known]
        if missing:
            self._parallel([lambda img=img: self._upload(img) for img in missing])

    # ------------------------------------------------------------------ reweight
    def _chunk(self, chunk: list[PreparedGroup], messages: Mapping[int, pb.RolloutGroup], opts: dict | None,
               per_group_errors: bool, images: Mapping[str, LoadedImage], rid: str, reuploaded: set[str],
               resend_evicted: bool = True) -> list[tuple[list[int], ReweightResponse]]:
        """One ``Reweight`` call for these groups, with ``Client``'s recoveries: an evicted image
        is uploaded again (once), a request over a size limit is split in two."""
        indices = [g.index for g in chunk]

        def reupload(sha: str) -> None:
            reuploaded.add(sha)
            self._known.discard(sha)
            log.info("kawhi: the server no longer holds image %s; uploading it again", sha)
            self._upload(images[sha], reupload=True)

        def can_reupload(sha: str | None) -> bool:
            img = images.get(sha or "")
            return img is not None and img.data is not None and sha not in reuploaded

        while True:
            request = pb.ReweightRequest(groups=[messages[i] for i in indices], per_group_errors=per_group_errors)
            if opts:
                request.options.CopyFrom(convert.options_to_message(opts))
            timeout = self.timeouts.read_timeout(sum(g.tokens for g in chunk))
            try:
                answer = self._call(self._stub.Reweight, request, timeout, rid,
                                    request_routing_key([g.route for g in chunk]))
            except ImageNotFound as err:
                sha = err.sha256 or sha_at(err.pointer, chunk)
                if sha and can_reupload(sha):
                    reupload(sha)
                    continue
                raise remap_error(err, indices) from None
            except PayloadTooLarge as err:
                if len(chunk) > 1 and (err.pointer or "") in ("", "/groups"):
                    self.stats.add(splits_on_413=1)
                    half = len(chunk) // 2
                    return (self._chunk(chunk[:half], messages, opts, per_group_errors, images, rid + ".a", reuploaded)
                            + self._chunk(chunk[half:], messages, opts, per_group_errors, images, rid + ".b",
                                          reuploaded))
                raise remap_error(err, indices) from None
            except KawhiHTTPError as err:
                raise remap_error(err, indices) from None
            break

        parsed = convert.response_from_message(answer)
        if len(parsed.results) != len(chunk):
            raise ProtocolError(f"Reweight answered {len(parsed.results)} results for {len(chunk)} groups",
                                request_id=rid)
        for g, r in zip(chunk, parsed.results):
            if g.id is not None and r.id is not None and r.id != g.id:
                raise ProtocolError(f"result for group {g.index} has id {r.id!r}, expected {g.id!r}", request_id=rid)
            if r.error is not None:
                r.error = remap_problem(r.error, indices)
        self.stats.add(reweight_requests=1, groups=len(chunk))
        pieces = [(indices, parsed)]
        if per_group_errors and resend_evicted:
            evicted = [g for g, r in zip(chunk, parsed.results)
                       if r.error is not None and r.error.status == 404 and r.error.type.endswith("image-not-found")
                       and images.get(g.sha256) is not None and images[g.sha256].data is not None]
            for sha in dict.fromkeys(g.sha256 for g in evicted):
                if sha not in reuploaded:
                    reupload(sha)
            if evicted:
                pieces += self._chunk(evicted, messages, opts, per_group_errors, images, rid + ".r", reuploaded,
                                      resend_evicted=False)
        return pieces

    # ------------------------------------------------------------------ concurrency
    def _in_slot(self, job: Callable[[], Any]) -> Any:
        with self._slots:
            return job()

    def _parallel(self, jobs: list[Callable[[], Any]]) -> list[Any]:
        if len(jobs) <= 1:
            return [self._in_slot(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=min(len(jobs), self.max_in_flight),
                                thread_name_prefix="kawhi-grpc-client") as pool:
            return [f.result() for f in [pool.submit(self._in_slot, j) for j in jobs]]


def _options(options: OptionsLike, overrides: Mapping[str, Any]) -> dict[str, Any] | None:
    """Options validated as ``Client`` validates them (InvalidRequest at ``/options/<name>``)."""
    raw = options_json(options, overrides)
    return json.loads(raw) if raw is not None else None


def _messages(prepared: Sequence[PreparedGroup | None], failed: dict[int, GroupResult],
              per_group_errors: bool) -> tuple[list[PreparedGroup], dict[int, pb.RolloutGroup]]:
    """The groups to send and their messages; a group the message cannot hold fails like any
    group the client refuses (its error result with per-group errors, else InvalidRequest)."""
    todo, messages = [], {}
    for g in prepared:
        if g is None:
            continue
        try:
            messages[g.index] = _group_message(g)
        except InvalidRequest as err:
            if not per_group_errors:
                raise
            failed[g.index] = GroupResult(id=g.id, error=err.problem)
            continue
        todo.append(g)
    return todo, messages


def _group_message(g: PreparedGroup) -> pb.RolloutGroup:
    try:
        return convert.group_to_message(json.loads(g.json))
    except (ValueError, TypeError) as exc:  # a value the message cannot hold (a token id past int32 ...)
        raise InvalidRequest(client_problem(f"the group cannot be sent over gRPC: {exc}", f"/groups/{g.index}"),
                             attempts=0) from None
