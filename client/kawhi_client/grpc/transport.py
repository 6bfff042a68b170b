"""What a ``Call`` of the shared core (``kawhi_client.actions``) is over gRPC, and what its
outcome is in the core's HTTP vocabulary. Used by both gRPC drivers (``GrpcClient``,
``AsyncGrpcClient``); they only make the stub call.

    GET  /readyz      -> grpc.health.v1 Check (NOT_SERVING: Info says why)
    GET  /v1/info     -> Info
    POST /v1/images   -> PutImage (the bytes in 1 MiB chunks)
    POST /v1/reweight -> Reweight (the request message the dialect built)

A status that carries our problem (``kawhi_client.grpc.status``) answers that problem with
its HTTP status, and RetryInfo as ``retry-after``: the core retries, fails over, splits a
413 and re-uploads an evicted image exactly as over HTTP. A status without it is the
transport's: UNAVAILABLE is a connection error, DEADLINE_EXCEEDED a read timeout (on an
attempt with the failover timeout, a hung replica; so is a connection accepted but never
answered within the connect timeout), UNKNOWN and INTERNAL a broken
exchange; any other answers the HTTP status of its code (RESOURCE_EXHAUSTED without
RetryInfo, a message over a size limit: 413).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2

from kawhi_client.actions import Call
from kawhi_client.errors import KawhiConnectionError, KawhiError, KawhiTimeout, error_from_response
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc.status import problem_from_status, retry_delay, unpack_details

SERVICE = "kawhi.v1.Kawhi"
SCHEME = "grpc"
IMAGE_CHUNK_BYTES = 1024 * 1024
RPC_OF_CALL = {
    ("GET", "/readyz"): "ready",
    ("GET", "/v1/info"): "info",
    ("POST", "/v1/images"): "image",
    ("POST", "/v1/reweight"): "reweight",
}
_FORWARDED = ("x-request-id", "x-kawhi-routing-key")  # the core's headers that travel as metadata
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# A peer whose TCP accepted the connection but that never sent its HTTP/2 SETTINGS within the
# connect timeout: a stopped or hung process (a dead one refuses the connection). The core
# treats it as an unanswered attempt, as over HTTP a read that times out on an accepted
# connection: on an attempt another replica could take over, a hung replica (skipped 30 s).
_HUNG_PEER = "timed out before receiving SETTINGS frame"


@dataclass
class GrpcReply:
    """A call's outcome as the core reads an HTTP response: ``status_code``, ``headers``
    (lower-case), ``content`` (JSON of a small answer or of a problem) and, for a reweight,
    the answer ``message`` itself (decoded by ``GrpcDialect``, never through JSON)."""

    status_code: int
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    message: Any = None
    reason_phrase: str = ""


def target_of(endpoint: str | None, default: str) -> str:
    """``grpc://host:port`` (a replica) -> ``host:port``; None -> the client's target."""
    if endpoint is None:
        return default
    return endpoint.removeprefix(f"{SCHEME}://")


def replica_url(target: str) -> str:
    """``host:port`` -> ``grpc://host:port`` (the identity of a replica in the hash); a
    ``dns+grpc://`` name or a URL with its scheme is kept."""
    target = target.strip()
    return target if "://" in target else f"{SCHEME}://{target}"


def rpc_of(call: Call) -> str:
    try:
        return RPC_OF_CALL[(call.method, call.path)]
    except KeyError:
        raise ValueError(f"kawhi_client: no gRPC method for {call.method} {call.path}") from None


def metadata(call: Call, base: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [*base, *((k.lower(), v) for k, v in call.headers.items() if k.lower() in _FORWARDED)]


def deadline(call: Call) -> float:
    """The call's deadline: its read timeout (the failover timeout on an attempt another
    replica could take over)."""
    return float(call.timeout.read or call.timeout.connect or 60.0)


def image_chunks(data: bytes) -> Iterator[pb.ImageChunk]:
    for at in range(0, len(data), IMAGE_CHUNK_BYTES):
        yield pb.ImageChunk(data=data[at:at + IMAGE_CHUNK_BYTES])


def health_request() -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=SERVICE)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def ready_reply() -> GrpcReply:
    return GrpcReply(200, _json({"state": "ready", "reasons": []}))


def serving(answer: Any) -> bool:
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def not_serving_reply(info_error: grpc.RpcError | None) -> GrpcReply:
    """Health said NOT_SERVING; ``info_error``: how the Info call failed (None: it answered,
    the service became ready in between). The phase comes from the problem: ``loading``,
    ``draining``, or ``failed`` (the model did not load: a final state)."""
    if info_error is None:
        return ready_reply()
    problem = problem_from_status(info_error.code(), info_error.details() or "", status_of(info_error))
    slug = problem.type.rsplit("/", 1)[-1]
    state = "failed" if slug == "unavailable" else slug
    return GrpcReply(503, _json({"state": state, "reasons": [problem.detail] if problem.detail else []}))


def info_reply(answer: Any) -> GrpcReply:
    return GrpcReply(200, _json(convert.from_struct(answer)))


def image_reply(answer: Any) -> GrpcReply:
    return GrpcReply(200, _json({"sha256": answer.sha256}))


def status_of(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status in the trailing metadata (sync and grpc.aio errors alike)."""
    for key, value in exc.trailing_metadata() or ():
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.MergeFromString(value)
            return status
    return None


def reply_of_error(exc: grpc.RpcError, rpc: str, target: str) -> GrpcReply:
    """The failed call as the core reads it: our problem as its HTTP answer; a transport
    failure raised as the httpx exception of its kind (module doc)."""
    code, details = exc.code(), exc.details() or ""
    status = status_of(exc)
    if "info" not in unpack_details(status):
        what = f"{target} {rpc}: {code.name}: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.UNAVAILABLE and _HUNG_PEER in details):
            raise httpx.ReadTimeout(what)
        if code == grpc.StatusCode.UNAVAILABLE:
            raise httpx.ConnectError(what)
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            raise httpx.RemoteProtocolError(what)
        if rpc == "ready":  # no health service, refused credentials ...: a final state, as the old client had it
            return GrpcReply(400, _json({"state": code.name, "reasons": [details] if details else []}))
    problem = problem_from_status(code, details, status)
    delay = retry_delay(status)
    headers = {"retry-after": repr(delay)} if delay is not None else {}
    return GrpcReply(problem.status, problem.model_dump_json(exclude_none=True).encode(), headers,
                     reason_phrase=code.name)


def error_of(exc: grpc.RpcError, rpc: str, target: str, request_id: str) -> KawhiError:
    """The typed error of a call that is not retried (a stream): what ``Client`` raises."""
    try:
        reply = reply_of_error(exc, rpc, target)
    except httpx.TimeoutException as timeout:
        return KawhiTimeout(f"{timeout} [request_id={request_id}]", request_id=request_id, attempts=1)
    except httpx.HTTPError as failure:
        return KawhiConnectionError(f"{failure} [request_id={request_id}]", request_id=request_id, attempts=1)
    return error_from_response(reply.status_code, reply.content, reason=reply.reason_phrase, request_id=request_id,
                               retry_after=retry_delay(status_of(exc)))
