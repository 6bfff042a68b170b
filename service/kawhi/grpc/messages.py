"""kawhi.v1 messages <-> the serving core's objects, with no JSON on the way.

In: a ``ReweightRequest`` (or one ``RolloutGroup`` of a stream) becomes the pipeline's
``ParsedRequest`` through the same checks as a JSON body (kawhi.pipeline.parse: the
value walk, strict pydantic models, the same kinds and pointers), minus what protobuf
already guarantees (a token id is an int32, text is valid UTF-8). The image bytes stay
bytes: the group holds their hash, ``ParsedRequest.images`` the bytes, and admission
checks them as it checks inline base64 (``/image/data``).

Out: ``PROTOBUF``, the service's codec for gRPC: the answer message built straight from
the ``ReweightResponse`` model (kawhi_client.grpc.convert) and serialised once; the
same bytes go on the wire (kawhi.grpc.server registers ``Reweight`` with a serializer
that passes bytes through) and into the idempotent store, so a stored answer is sent
as it is.
"""

from __future__ import annotations

import hashlib
from typing import Any

from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.schema import ReweightResponse

from kawhi.errors import KawhiError
from kawhi.pipeline.encoding import WireFormat
from kawhi.pipeline.parse import ParsedRequest, check_values, parse_options, parse_prepared_groups


class ProtobufCodec:
    """The answer as a serialised ``kawhi.v1.ReweightResponse`` (``token_arrays=false``: without
    the per-token advantages and weights; ``encoding_format`` changes nothing here)."""

    name = "protobuf"

    def encode(self, response: ReweightResponse, wire: WireFormat) -> tuple[bytes, bytes]:
        data = convert.response_to_message(response, token_arrays=wire.token_arrays).SerializeToString()
        return data, data

    def decode(self, data: bytes) -> bytes:
        return data


PROTOBUF = ProtobufCodec()


def _group(m: pb.RolloutGroup) -> tuple[dict[str, Any], bytes | None, list[list[int] | None]]:
    """A group message -> (the wire dict its checks run on, its inline image bytes, each
    response's token ids: int32 by the schema, set after validation). Inline bytes travel
    beside the dict, which names their hash."""
    return convert.group_parts(m, lambda data: {"sha256": hashlib.sha256(data).hexdigest()})


def _checked(g: dict[str, Any]) -> dict[str, Any]:
    """``g`` after the value walk (non-finite numbers, depth)."""
    check_values(g, depth=2)
    return g


def parse_request_message(m: pb.ReweightRequest) -> ParsedRequest:
    """A ReweightRequest as the ParsedRequest its JSON body would give (see the module doc)."""
    if not len(m.groups):
        raise KawhiError("validation", "groups must hold at least one rollout group", "/groups")
    encoding = m.encoding_format if m.HasField("encoding_format") else "float"
    if encoding not in ("float", "base64"):
        raise KawhiError("validation", "encoding_format must be 'float' or 'base64'", "/encoding_format")
    options = _options(convert.options_from_message(m.options)) if m.HasField("options") else {}
    parsed = _parse_groups(list(m.groups), options, m.per_group_errors)
    parsed.encoding_format = encoding
    parsed.token_arrays = m.token_arrays if m.HasField("token_arrays") else True
    return parsed


def parse_group_message(m: pb.RolloutGroup, options: dict[str, Any] | None, token_arrays: bool = True) -> ParsedRequest:
    """One group of a stream as a one-group request with per-group errors."""
    parsed = _parse_groups([m], _options(options) if options else {}, True)
    parsed.token_arrays = token_arrays
    return parsed


def _options(raw: dict[str, Any]) -> dict[str, Any]:
    check_values({"options": raw})
    return parse_options(raw)


def _parse_groups(messages: list[pb.RolloutGroup], options: dict[str, Any], per_group_errors: bool) -> ParsedRequest:
    raws, images, token_ids = [], {}, []
    for i, message in enumerate(messages):
        g, data, ids = _group(message)
        raws.append(g)
        token_ids.append(ids)
        if data is not None:
            images[i] = data
    parsed = parse_prepared_groups(raws, options, per_group_errors=per_group_errors, check=_checked)
    for group, ids in zip(parsed.groups, token_ids):
        if group is not None:  # validated without the ids: int32 lists need no second pass
            for response, given in zip(group.responses, ids):
                response.token_ids = given
    parsed.images = images
    return parsed
