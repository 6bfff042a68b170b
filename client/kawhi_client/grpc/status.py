"""The error catalogue over gRPC: an RFC 9457 problem <-> a google.rpc.Status.

Server side, ``status_for(problem, retry_after)`` builds the rich status of a
problem: the code below, and details

* ``google.rpc.ErrorInfo`` — reason = the problem's slug (``queue-full``,
  ``validation`` ...), domain ``kawhi.dev``, metadata ``problem`` = the whole problem
  JSON (so a client rebuilds exactly the problem an HTTP caller gets);
* ``google.rpc.BadRequest`` — one field violation per offending field, ``field`` =
  the JSON pointer into the request (``/groups/3/responses/1/reward``);
* ``google.rpc.RetryInfo`` — when a retry after that delay may succeed (429, 503).

HTTP status -> gRPC code: 400/415/422 INVALID_ARGUMENT, 401 UNAUTHENTICATED,
403 PERMISSION_DENIED, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED *without* RetryInfo
(a size limit: retrying cannot help), 429 RESOURCE_EXHAUSTED *with* RetryInfo (queue
full), 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED, other 5xx INTERNAL.

Client side, ``problem_from_status(code, details, status)`` reverses it; a status
without our details (the transport's own: connection refused, message too large,
the caller's deadline) gets a synthetic problem with the HTTP status of its code.
"""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from kawhi_client.schema import Problem

DOMAIN = "kawhi.dev"
TYPE_BASE = "https://kawhi.dev/problems/"

_BY_HTTP: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# A status that carries none of our details: the HTTP status the client treats it as.
_HTTP_BY_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # without RetryInfo; with it, 429
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def code_for(http_status: int) -> grpc.StatusCode:
    if http_status in _BY_HTTP:
        return _BY_HTTP[http_status]
    if http_status >= 500:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INVALID_ARGUMENT


def _pack(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def status_for(problem: Problem, retry_after: float | None = None,
               code: grpc.StatusCode | None = None) -> status_pb2.Status:
    """The google.rpc.Status of a problem (see the module doc); ``code`` overrides the code
    of its HTTP status (the server passes its error catalogue's)."""
    code = code if code is not None else code_for(problem.status)
    body = problem.model_dump(mode="json")
    slug = problem.type.rsplit("/", 1)[-1] if problem.type.startswith(TYPE_BASE) else problem.type
    info = error_details_pb2.ErrorInfo(
        reason=slug, domain=DOMAIN,
        metadata={"problem": json.dumps(body, separators=(",", ":"), ensure_ascii=False), "http_status": str(problem.status)},
    )
    details = [_pack(info)]
    violations = []
    listed = body.get("errors")
    if isinstance(listed, list) and listed:
        for e in listed:
            if isinstance(e, dict):
                violations.append(error_details_pb2.BadRequest.FieldViolation(
                    field=str(e.get("pointer") or ""), description=str(e.get("detail") or "")))
    elif problem.pointer:
        violations.append(error_details_pb2.BadRequest.FieldViolation(field=problem.pointer, description=problem.detail))
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    if retry_after is not None and problem.status in (429, 503):
        whole = int(math.floor(retry_after))
        delay = duration_pb2.Duration(seconds=whole, nanos=int((retry_after - whole) * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = f"{problem.title}: {problem.detail}" if problem.detail else problem.title
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def unpack_details(status: status_pb2.Status | None) -> dict[str, Any]:
    """{'info': ErrorInfo, 'bad_request': BadRequest, 'retry': RetryInfo} — those present."""
    found: dict[str, Any] = {}
    for d in status.details if status is not None else ():
        for key, cls in (("info", error_details_pb2.ErrorInfo), ("bad_request", error_details_pb2.BadRequest),
                         ("retry", error_details_pb2.RetryInfo)):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                found[key] = msg
    return found


def retry_delay(status: status_pb2.Status | None) -> float | None:
    retry = unpack_details(status).get("retry")
    if retry is None:
        return None
    return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9


def problem_from_status(code: grpc.StatusCode, details: str, status: status_pb2.Status | None) -> Problem:
    """The problem a status stands for (ours, rebuilt exactly; or a synthetic one)."""
    found = unpack_details(status)
    info = found.get("info")
    if info is not None and info.domain == DOMAIN and "problem" in info.metadata:
        try:
            return Problem.model_validate(json.loads(info.metadata["problem"]))
        except ValueError:
            pass
    http = _HTTP_BY_CODE.get(code, 500)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in found:
        http = 429
    pointer = None
    bad = found.get("bad_request")
    if bad is not None and bad.field_violations:
        pointer = bad.field_violations[0].field
    name = code.name if hasattr(code, "name") else str(code)
    return Problem(type=f"{TYPE_BASE}grpc-{name.lower().replace('_', '-')}", title=f"gRPC {name}", status=http,
                   detail=details or "", pointer=pointer)


__all__ = ["code_for", "problem_from_status", "retry_delay", "status_for", "unpack_details"]
