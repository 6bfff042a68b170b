"""The gRPC dialect of the shared core (see ``kawhi_client.dialect``): a reweight request is
a ``kawhi.v1.ReweightRequest`` built from the groups' messages, its answer a
``ReweightResponse`` message decoded straight to the client's models (no JSON)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kawhi_client.errors import InvalidRequest, client_problem
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc.transport import RPC_OF_CALL, SCHEME, target_of
from kawhi_client.planning import PreparedGroup
from kawhi_client.schema import GroupResult, ReweightResponse

# A repeated field's tag and length prefix: what a group adds to a request besides its own bytes.
GROUP_FRAMING_BYTES = 8
RPC_NAMES = {"ready": "grpc.health.v1.Health/Check", "info": "Info", "image": "PutImage", "reweight": "Reweight"}


class GrpcDialect:
    content_type = None
    replica_schemes = (SCHEME,)

    def __init__(self, token_arrays: bool = True) -> None:
        self.token_arrays = token_arrays

    def describe(self, method: str, path: str, endpoint: str) -> str:
        rpc = RPC_NAMES.get(RPC_OF_CALL.get((method, path), ""), f"{method} {path}")
        return f"{rpc} on {target_of(endpoint, endpoint)}"

    def encode_groups(self, prepared: Sequence[PreparedGroup | None], failed: dict[int, GroupResult],
                      per_group_errors: bool) -> dict[int, Any]:
        """The groups' messages; a group the message cannot hold (a token id past int32 ...)
        fails like any group the client refuses (its error result with per-group errors,
        else InvalidRequest)."""
        messages: dict[int, Any] = {}
        for g in prepared:
            if g is None:
                continue
            try:
                messages[g.index] = group_message(g)
            except InvalidRequest as err:
                if not per_group_errors:
                    raise
                failed[g.index] = GroupResult(id=g.id, error=err.problem)
        return messages

    def size(self, encoded: Any) -> int:
        return encoded.ByteSize() + GROUP_FRAMING_BYTES

    def overhead(self, options: bytes | None, per_group_errors: bool) -> int:
        return self.content([], options, per_group_errors).ByteSize()

    def content(self, encoded: Sequence[Any], options: bytes | None, per_group_errors: bool) -> pb.ReweightRequest:
        request = pb.ReweightRequest(groups=list(encoded), per_group_errors=per_group_errors)
        if not self.token_arrays:
            request.token_arrays = False
        message = convert.options_to_message(json.loads(options)) if options is not None else None
        if message is not None:
            request.options.CopyFrom(message)
        return request

    def read_reweight(self, resp: Any, request_id: str) -> ReweightResponse:
        return convert.response_from_message(resp.message)


def group_message(g: PreparedGroup) -> pb.RolloutGroup:
    try:
        return convert.group_to_message(json.loads(g.json))
    except (ValueError, TypeError) as exc:  # a value the message cannot hold (a token id past int32 ...)
        raise InvalidRequest(client_problem(f"the group cannot be sent over gRPC: {exc}", f"/groups/{g.index}"),
                             attempts=0) from None
