"""RFC 9457 problem details: every error the server answers is one of these.

A problem carries ``type``, ``title``, ``status``, ``detail`` and ``pointer`` — a JSON
pointer (RFC 6901) into the *request* naming the offending field, e.g.
``/groups/3/responses/1/reward``; ``""`` means the request as a whole (a full queue,
a missing API key, a body that is too large). The wire model is
``kawhi_client.schema.Problem``; extra members (``request_id``, ``errors``,
``sha256`` ...) are RFC 9457 extensions.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from pydantic import ValidationError
from starlette.responses import Response

from kawhi.engine.errors import escape_token, loc_to_pointer, pointer, validation_message  # noqa: F401 (re-exported)
from kawhi_client.schema import Problem

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://kawhi.dev/problems/"

# slug -> default title; the slug is also the `type` label of kawhi_errors_total.
TITLES: dict[str, str] = {
    "malformed-json": "Malformed JSON",
    "validation": "Invalid request",
    "invalid-group": "Invalid rollout group",
    "invalid-image": "Invalid image",
    "image-not-found": "Unknown image",
    "path-not-allowed": "Paths and URLs are not read",
    "too-large": "Request too large",
    "unauthorized": "Unauthorized",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "unsupported-media-type": "Unsupported media type",
    "queue-full": "Queue full",
    "loading": "Model loading",
    "draining": "Server draining",
    "unavailable": "Service unavailable",
    "timeout": "Request timed out",
    "internal": "Internal server error",
}


def type_uri(slug: str) -> str:
    return TYPE_BASE + slug


class ProblemError(Exception):
    """Raise anywhere in a request to answer a problem+json."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str = "",
        pointer: Optional[str] = "",
        *,
        title: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or slug)
        self.status = status
        self.slug = slug
        self.title = title or TITLES.get(slug, slug.replace("-", " ").capitalize())
        self.detail = detail
        self.pointer = pointer
        self.headers = dict(headers or {})
        self.extra = extra

    def problem(self) -> Problem:
        return Problem(
            type=type_uri(self.slug),
            title=self.title,
            status=self.status,
            detail=self.detail,
            pointer=self.pointer,
            **self.extra,
        )


def problem_response(
    err: ProblemError, request_id: Optional[str] = None, headers: Optional[Mapping[str, str]] = None
) -> Response:
    body = err.problem().model_dump(mode="json")
    if request_id:
        body["request_id"] = request_id
    all_headers = dict(err.headers)
    if headers:
        all_headers.update(headers)
    return Response(
        content=json.dumps(body, separators=(",", ":")).encode(),
        status_code=err.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=all_headers,
    )


# --------------------------------------------------------------------------------------
# Validation errors (JSON pointers: kawhi.engine.errors)


def validation_problem(
    exc: ValidationError | Iterable[Mapping[str, Any]], prefix: Sequence[Any] = ()
) -> ProblemError:
    """A pydantic ValidationError -> one 422 problem; pointer = the first error's location.

    Every error is also listed in the ``errors`` extension as ``{pointer, detail}``.
    """
    errors = list(exc.errors() if isinstance(exc, ValidationError) else exc)
    listed = []
    for e in errors:
        listed.append({"pointer": loc_to_pointer(e.get("loc", ()), prefix), "detail": validation_message(e)})
    # The most specific error first: pydantic reports e.g. a union's failures for every
    # member; the deepest pointer is the most useful one for a caller.
    first = listed[0] if listed else {"pointer": pointer(*prefix), "detail": "invalid request"}
    detail = first["detail"]
    if len(listed) > 1:
        detail += f" (and {len(listed) - 1} more error(s), see 'errors')"
    return ProblemError(422, "validation", detail, first["pointer"], errors=listed)


def from_group_error(exc: Any, prefix: str = "") -> ProblemError:
    """An engine GroupError (pointer relative to its group) -> a ProblemError for the request.

    The wire form is the engine's own ``to_problem`` (so the HTTP answer and the
    in-process ``Engine.reweight`` name an error the same way), prefixed with the
    group's place in the request (``/groups/3``).
    """
    body = exc.to_problem(prefix)
    type_ = str(body.get("type", ""))
    slug = type_.rsplit("/", 1)[-1] if type_.startswith(TYPE_BASE) else "invalid-group"
    return ProblemError(
        int(body.get("status", 422)),
        slug,
        str(body.get("detail", "")),
        body.get("pointer", prefix),
        title=str(body.get("title") or TITLES.get(slug, "Invalid rollout group")),
    )
