"""The one closed catalogue of errors kawhi answers, for every front end.

Each kind has a type slug (``https://kawhi.dev/problems/<slug>``), a title, an HTTP
status, a gRPC status-code name and a note saying where its JSON pointer comes from.
In-process use, the CLI, HTTP and gRPC all raise and render :class:`KawhiError`; the
HTTP status and the gRPC code are looked up here and nowhere else.

Pointers are RFC 6901 JSON pointers into the caller's document: ``/groups/3/image``
over the wire, relative to the group (``/image``) for a group-level error before a
front end places it (see :meth:`KawhiError.placed`). ``""`` is the request as a whole.

This module imports nothing heavy: the client-free parts of the service and the
engine both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TYPE_BASE = "https://kawhi.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


@dataclass(frozen=True)
class ErrorKind:
    slug: str
    title: str
    http: int
    grpc: str  # grpc.StatusCode member name
    pointer: str  # where the pointer comes from
    retryable: bool = False

    @property
    def type(self) -> str:
        return TYPE_BASE + self.slug


_FIELD = "the offending field of the request"
_REQUEST = "always '' (the request as a whole)"

CATALOGUE: dict[str, ErrorKind] = {k.slug: k for k in (
    # the body itself
    ErrorKind("malformed-json", "Malformed JSON", 400, "INVALID_ARGUMENT",
              "'' (a body that is not UTF-8 or not JSON, nested too deep, or an absurdly long integer); "
              "NaN, Infinity, overflowing numbers and lone surrogates are 'validation' at the value"),
    ErrorKind("unsupported-media-type", "Unsupported media type", 415, "INVALID_ARGUMENT", _REQUEST),
    # content
    ErrorKind("validation", "Invalid request", 422, "INVALID_ARGUMENT",
              "the schema location of the first error (/options/<name> for an option)"),
    ErrorKind("invalid-group", "Invalid rollout group", 422, "INVALID_ARGUMENT",
              "the field of the group the engine refused (reward, advantages, messages, token id)"),
    ErrorKind("invalid-image", "Invalid image", 422, "INVALID_ARGUMENT", "the image field (/groups/i/image/data)"),
    ErrorKind("non-finite", "Result not finite", 422, "INVALID_ARGUMENT",
              "the rewards or advantages of the group whose numbers overflow"),
    ErrorKind("path-not-allowed", "Paths and URLs are not read", 422, "INVALID_ARGUMENT", "/groups/i/image/path"),
    ErrorKind("image-not-found", "Unknown image", 404, "NOT_FOUND", "/groups/i/image/sha256 (or /image/path)"),
    ErrorKind("too-large", "Request too large", 413, "RESOURCE_EXHAUSTED", "the list or value over its limit"),
    # access and routing
    ErrorKind("unauthorized", "Unauthorized", 401, "UNAUTHENTICATED", _REQUEST),
    ErrorKind("not-found", "Not found", 404, "UNIMPLEMENTED", _REQUEST),
    ErrorKind("method-not-allowed", "Method not allowed", 405, "UNIMPLEMENTED", _REQUEST),
    ErrorKind("bad-request", "Bad request", 400, "INVALID_ARGUMENT", _REQUEST),
    ErrorKind("not-acceptable", "Not acceptable", 406, "INVALID_ARGUMENT", _REQUEST),
    ErrorKind("request-timeout", "Request not received in time", 408, "DEADLINE_EXCEEDED", _REQUEST, True),
    # load and lifecycle
    ErrorKind("queue-full", "Queue full", 429, "RESOURCE_EXHAUSTED", _REQUEST, True),
    ErrorKind("loading", "Model loading", 503, "UNAVAILABLE", _REQUEST, True),
    ErrorKind("draining", "Server draining", 503, "UNAVAILABLE", _REQUEST, True),
    ErrorKind("unavailable", "Service unavailable", 503, "UNAVAILABLE", _REQUEST, True),
    ErrorKind("timeout", "Request timed out", 504, "DEADLINE_EXCEEDED", _REQUEST, True),
    # never answered to a caller: a client that went away is only counted and logged
    ErrorKind("client-closed", "Client closed the request", 499, "CANCELLED", _REQUEST),
    # a bug of ours, never a caller's input
    ErrorKind("internal", "Internal server error", 500, "INTERNAL", "'' or the group that failed"),
)}


def kind(slug: str) -> ErrorKind:
    """The catalogue entry of ``slug`` (KeyError for a slug outside the closed catalogue)."""
    return CATALOGUE[slug]


def http_status(slug: str) -> int:
    return CATALOGUE[slug].http


def grpc_code(slug: str) -> str:
    return CATALOGUE[slug].grpc


def slug_for_status(status: int) -> str:
    """The kind an old-style (status-only) group error belongs to."""
    return {413: "too-large", 404: "image-not-found", 503: "unavailable", 500: "internal"}.get(status, "invalid-group")


def escape_token(token: Any) -> str:
    """One JSON-pointer reference token (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer(*tokens: Any) -> str:
    """pointer('groups', 3, 'image') -> '/groups/3/image'."""
    return "".join("/" + escape_token(t) for t in tokens)


class KawhiError(Exception):
    """A caller-facing error: a catalogue kind, a detail written for the caller, a pointer.

    ``extra`` members become RFC 9457 extensions (``errors``, ``sha256``, ``state`` ...);
    ``headers`` are HTTP headers (``Retry-After``). ``detail`` never holds a repr, an
    address, an exception class name or an internal host.
    """

    def __init__(self, slug: str, detail: str = "", pointer: str | None = "", *,
                 headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        if slug not in CATALOGUE:
            raise ValueError(f"error kind {slug!r} is not in the catalogue")
        super().__init__(f"{pointer or '(request)'}: {detail or slug}")
        self.slug = slug
        self.detail = detail
        self.pointer = pointer if pointer is not None else ""
        self.headers = dict(headers or {})
        self.extra = extra

    @property
    def kind(self) -> ErrorKind:
        return CATALOGUE[self.slug]

    @property
    def status(self) -> int:
        return self.kind.http

    @property
    def title(self) -> str:
        return self.kind.title

    @property
    def grpc_code(self) -> str:
        return self.kind.grpc

    def placed(self, prefix: str) -> KawhiError:
        """The same error with its pointer prefixed (``/groups/3`` + ``/image``)."""
        extra = dict(self.extra)
        if isinstance(extra.get("errors"), list):
            extra["errors"] = [{**e, "pointer": prefix + str(e.get("pointer", ""))} for e in extra["errors"]]
        return KawhiError(self.slug, self.detail, prefix + self.pointer, headers=self.headers, **extra)

    def to_problem(self, prefix: str = "") -> dict[str, Any]:
        """RFC 9457 problem details (a JSON-ready dict), pointer prefixed with ``prefix``."""
        body: dict[str, Any] = {"type": self.kind.type, "title": self.title, "status": self.status,
                                "detail": self.detail, "pointer": prefix + self.pointer}
        body.update(self.extra)
        return body


class UserError(Exception):
    """A mistake of a command-line user (missing file, bad flag, not a model folder):
    the CLI prints it as one line on stderr and exits with status 2."""
