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

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message
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


class Undecodable:
    """What a request deserializer gives for bytes that are no message of its type (the
    servicer answers it INVALID_ARGUMENT; grpc would answer a raised DecodeError UNKNOWN)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> KawhiError:
        return KawhiError("bad-request", f"the bytes are not a {self.type_name} message (protobuf wire format)")


def decoder(message_type: type[Message]) -> Any:
    """A request deserializer: the message, or an :class:`Undecodable`."""
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(name)

    return decode


def plain(value: struct_pb2.Value, whole_numbers: bool = False) -> Any:
    """A google.protobuf.Value as Python, keeping NaN and infinity as floats (json_format
    refuses them with a ValueError) so the value walk answers them as it does in JSON:
    ``validation`` at the value. ``whole_numbers``: whole doubles become ints (head indices)."""
    which = value.WhichOneof("kind")
    if which == "struct_value":
        return {k: plain(v, whole_numbers) for k, v in value.struct_value.fields.items()}
    if which == "list_value":
        return [plain(v, whole_numbers) for v in value.list_value.values]
    if which == "number_value":
        number = value.number_value
        return int(number) if whole_numbers and number.is_integer() and abs(number) < 2**53 else number
    if which == "string_value":
        return value.string_value
    if which == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind set


def options_of_message(m: pb.Options) -> dict[str, Any]:
    """``convert.options_from_message``, with ``heads`` read by :func:`plain`."""
    if not m.HasField("heads"):
        return convert.options_from_message(m)
    rest = pb.Options()
    rest.CopyFrom(m)
    rest.ClearField("heads")
    return {**convert.options_from_message(rest), "heads": plain(m.heads, whole_numbers=True)}


def _group(m: pb.RolloutGroup) -> tuple[dict[str, Any], bytes | None, list[list[int] | None]]:
    """A group message -> (the wire dict its checks run on, its inline image bytes, each
    response's token ids: int32 by the schema, set after validation). Inline bytes travel
    beside the dict, which names their hash. The messages are read here by :func:`plain`
    (convert.group_parts reads them with json_format, which raises on NaN and infinity)."""
    def inline(data: bytes) -> dict[str, Any]:
        return {"sha256": hashlib.sha256(data).hexdigest()}

    if not len(m.messages):
        return convert.group_parts(m, inline)
    rest = pb.RolloutGroup()
    rest.CopyFrom(m)
    rest.ClearField("messages")
    g, data, token_ids = convert.group_parts(rest, inline)
    g["messages"] = [{k: plain(v) for k, v in s.fields.items()} for s in m.messages]
    return g, data, token_ids


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
    options = _options(options_of_message(m.options)) if m.HasField("options") else {}
    parsed = _parse_groups(list(m.groups), options, m.per_group_errors)
    parsed.encoding_format = encoding
    parsed.token_arrays = m.token_arrays if m.HasField("token_arrays") else True
    return parsed


def parse_group_message(m: pb.RolloutGroup, options: pb.Options | None, token_arrays: bool = True) -> ParsedRequest:
    """One group of a stream as a one-group request with per-group errors; ``options``: those of
    the stream message it came in (bad options are this group's error: the stream goes on)."""
    parsed = _parse_groups([m], _options(options_of_message(options)) if options is not None else {}, True)
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
