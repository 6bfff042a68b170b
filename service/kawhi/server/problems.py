"""RFC 9457 problem details over HTTP: how a :class:`kawhi.errors.KawhiError` is answered.

A problem carries ``type``, ``title``, ``status``, ``detail`` and ``pointer`` — a JSON
pointer (RFC 6901) into the *request* naming the offending field, e.g.
``/groups/3/responses/1/reward``; ``""`` means the request as a whole. The kinds,
their titles and HTTP statuses are the catalogue in ``kawhi/errors.py``; this module
only renders them. Extra members (``request_id``, ``errors``, ``sha256`` ...) are
RFC 9457 extensions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import Response

from kawhi.errors import PROBLEM_MEDIA_TYPE, KawhiError


def problem_response(
    err: KawhiError, request_id: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    body = err.to_problem()
    if request_id:
        body["request_id"] = request_id
    all_headers = dict(err.headers)
    if headers:
        all_headers.update(headers)
    return Response(
        content=json.dumps(body, separators=(",", ":"), allow_nan=False).encode(),
        status_code=err.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=all_headers,
    )
