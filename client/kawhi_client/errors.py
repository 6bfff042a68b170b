"""Typed exceptions of the client. Every error the service answers is RFC 9457
problem+json (docs/api.md); the client turns it into one of these, carrying the
problem, the HTTP status, the JSON pointer to the offending field and the
``X-Request-ID`` of the request (the same id on every retry of it), so a failure in a
training log can be matched with the server's log line.

Hierarchy::

    KawhiError
    ├── KawhiHTTPError               .problem .status .pointer .request_id .attempts
    │   ├── InvalidRequest           400, 415, 422 (and input the client refused before sending)
    │   ├── Unauthorized             401, 403
    │   ├── NotFound                 404
    │   │   └── ImageNotFound        404 for an image hash the server does not hold (.sha256)
    │   ├── PayloadTooLarge          413
    │   ├── Overloaded               429, after the retries (.retry_after)
    │   └── ServerError              other 5xx
    │       ├── Unavailable          503, after the retries (.retry_after)
    │       └── GatewayTimeout       504, after the retries (also a KawhiTimeout)
    ├── KawhiTimeout                 no answer in time (client side), after the retries
    ├── KawhiConnectionError         could not connect / connection dropped, after the retries
    ├── ServerNotReady               /readyz did not say ready within the wait (.state .reasons)
    └── ProtocolError                the server answered something that breaks the contract
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kawhi_client.schema import Problem


class KawhiError(Exception):
    """Base class of every error raised by kawhi_client."""

    request_id: str | None = None
    attempts: int = 0

    def __reduce__(self) -> Any:
        # picklable whatever the constructor's signature (trainers ship errors across
        # processes, e.g. Ray workers)
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


def _rebuild(cls: type, args: tuple, state: dict) -> KawhiError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class KawhiHTTPError(KawhiError):
    """The service answered an error status; ``problem`` is its problem+json body."""

    def __init__(
        self,
        problem: Problem,
        *,
        request_id: str | None = None,
        attempts: int = 1,
        retry_after: float | None = None,
    ) -> None:
        self.problem = problem
        self.request_id = request_id
        self.attempts = attempts
        self.retry_after = retry_after
        Exception.__init__(self, self._message())

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def pointer(self) -> str | None:
        return self.problem.pointer

    @property
    def title(self) -> str:
        return self.problem.title

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def type(self) -> str:
        return self.problem.type

    def _message(self) -> str:
        p = self.problem
        msg = f"{p.status} {p.title}"
        if p.detail:
            msg += f": {p.detail}"
        if p.pointer:
            msg += f" (at {p.pointer})"
        extras = []
        if self.request_id:
            extras.append(f"request_id={self.request_id}")
        if self.attempts > 1:
            extras.append(f"attempts={self.attempts}")
        if extras:
            msg += " [" + ", ".join(extras) + "]"
        return msg


class InvalidRequest(KawhiHTTPError):
    """400/415/422: the request is wrong; ``pointer`` names the field. Never retried.

    Also raised before anything is sent for input the client cannot send (an image that
    cannot be read, a group that does not match the wire schema); then ``request_id``
    is None and the problem's ``type`` ends in ``client-validation``.
    """


class Unauthorized(KawhiHTTPError):
    """401/403: missing or wrong API key. Never retried."""


class NotFound(KawhiHTTPError):
    """404."""


class ImageNotFound(NotFound):
    """404 for an image hash the server does not hold (evicted, or never sent)."""

    @property
    def sha256(self) -> str | None:
        return getattr(self.problem, "sha256", None)


class PayloadTooLarge(KawhiHTTPError):
    """413: a size limit was exceeded (the pointer says which part)."""


class Overloaded(KawhiHTTPError):
    """429: the server's queue stayed full through every retry."""


class ServerError(KawhiHTTPError):
    """5xx."""


class Unavailable(ServerError):
    """503: the server stayed loading/draining/unavailable through every retry."""


class KawhiTimeout(KawhiError):
    """No answer in time (after the retries)."""

    def __init__(self, message: str, *, request_id: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.attempts = attempts


class GatewayTimeout(ServerError, KawhiTimeout):
    """504: the server's (or a proxy's) deadline passed, after the retries."""


class KawhiConnectionError(KawhiError):
    """The connection could not be made or was dropped (after the retries)."""

    def __init__(self, message: str, *, request_id: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.attempts = attempts


class ServerNotReady(KawhiError):
    """``/readyz`` did not report ready within the wait (or reported ``failed``)."""

    def __init__(
        self,
        message: str,
        *,
        state: str | None = None,
        reasons: list[str] | None = None,
        waited_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.state = state
        self.reasons = list(reasons or [])
        self.waited_s = waited_s


class ProtocolError(KawhiError):
    """The server's answer breaks the wire contract (wrong count of results, bad JSON ...)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


# ---------------------------------------------------------------------------- mapping


def problem_from_body(status: int, body: bytes, reason: str = "") -> Problem:
    """The problem+json in an error body; a synthetic one when the body is not one
    (e.g. an HTML 502 page from a proxy)."""
    try:
        obj = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict):
        obj.setdefault("status", status)
        obj.setdefault("title", reason or f"HTTP {status}")
        try:
            return Problem.model_validate(obj)
        except ValueError:
            pass
    text = body[:500].decode("utf-8", "replace").strip() if body else ""
    return Problem(title=reason or f"HTTP {status}", status=status, detail=text)


def error_class(status: int, problem: Problem | None = None) -> type[KawhiHTTPError]:
    if status in (400, 415, 422):
        return InvalidRequest
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        if problem is not None and (problem.type.endswith("/image-not-found") or getattr(problem, "sha256", None)):
            return ImageNotFound
        return NotFound
    if status == 413:
        return PayloadTooLarge
    if status == 429:
        return Overloaded
    if status == 503:
        return Unavailable
    if status == 504:
        return GatewayTimeout
    if status >= 500:
        return ServerError
    if 400 <= status < 500:
        return InvalidRequest
    return KawhiHTTPError


def error_from_response(
    status: int,
    body: bytes,
    *,
    reason: str = "",
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    attempts: int = 1,
    retry_after: float | None = None,
) -> KawhiHTTPError:
    """The typed exception for an error answer (status >= 400)."""
    problem = problem_from_body(status, body, reason)
    rid = request_id
    if headers is not None:
        rid = headers.get("x-request-id") or rid
    rid = rid or getattr(problem, "request_id", None)
    cls = error_class(status, problem)
    return cls(problem, request_id=rid, attempts=attempts, retry_after=retry_after)


def client_problem(detail: str, pointer: str, **extra: Any) -> Problem:
    """A 422 problem built by the client for input it refuses to send."""
    return Problem(
        type="https://kawhi.dev/problems/client-validation",
        title="Invalid request (checked by the client)",
        status=422,
        detail=detail,
        pointer=pointer,
        **extra,
    )
