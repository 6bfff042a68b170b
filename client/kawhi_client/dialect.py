"""How the shared ``Core`` (``kawhi_client.core``) puts a reweight request on the wire and
reads its answer back: the part of the protocol that differs between HTTP (JSON bodies,
here) and gRPC (kawhi.v1 messages, ``kawhi_client.grpc.dialect``). Everything else — the
retries, failover, 413 split, eviction re-upload, readiness and planning — is the Core's
and the same for both.

A dialect answers, for the groups of one call:

* ``encode_groups``: each group as the wire carries it (a group the wire cannot carry
  fails like any group the client refuses);
* ``size``/``overhead``: the bytes a request of those groups will take (for packing under
  the server's body limit);
* ``content``: the request of some encoded groups (what the ``Call`` action carries);
* ``read_reweight``: the answer as a ``ReweightResponse``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from kawhi_client.errors import ProtocolError
from kawhi_client.planning import PreparedGroup, body_overhead, build_body
from kawhi_client.schema import GroupResult, ReweightResponse


class HttpDialect:
    """``POST /v1/reweight`` with a JSON body built from the groups' serialised JSON."""

    content_type = "application/json"
    replica_schemes = ("http", "https")

    def __init__(self, wire: bytes = b"") -> None:
        self.wire = wire  # request fields choosing the answer's array encoding (planning.wire_fields)

    def describe(self, method: str, path: str, endpoint: str) -> str:
        """A call as error messages name it."""
        return f"{method} {endpoint}{path}"

    def encode_groups(self, prepared: Sequence[PreparedGroup | None], failed: dict[int, GroupResult],
                      per_group_errors: bool) -> dict[int, Any]:
        return {g.index: g.json for g in prepared if g is not None}

    def size(self, encoded: Any) -> int:
        return len(encoded)

    def overhead(self, options: bytes | None, per_group_errors: bool) -> int:
        return body_overhead(options, per_group_errors, self.wire)

    def content(self, encoded: Sequence[Any], options: bytes | None, per_group_errors: bool) -> Any:
        return build_body(encoded, options, per_group_errors, self.wire)

    def read_reweight(self, resp: Any, request_id: str) -> ReweightResponse:
        try:
            return ReweightResponse.model_validate_json(resp.content)
        except ValidationError as exc:
            raise ProtocolError(f"POST /v1/reweight answered an invalid body: {exc}", request_id=request_id) from None
