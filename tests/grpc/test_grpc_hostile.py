"""Hostile kawhi.v1 messages over a real grpc channel (issue 26.4): a non-finite number inside a
google.protobuf.Value, bytes that are no message at all, garbage in the middle of a stream.

Each is sent as bytes through a generic call (``channel.unary_unary`` / ``stream_stream``
without a serializer), as a hostile client would, and each has an HTTP twin: the same
mistake in a JSON body. The gRPC answer must be the twin's: the same problem type and
pointer, and a 4xx kind (INVALID_ARGUMENT), never INTERNAL or UNKNOWN; inside a stream it
is that group's error and the stream goes on.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
import pytest
from grpc_fixtures import GrpcServerThread, problem_of
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from server_fixtures import small_group

REWEIGHT = "/kawhi.v1.Kawhi/Reweight"
STREAM = "/kawhi.v1.Kawhi/ReweightStream"
GARBAGE = b"\xff\xff\xff\xff\x0f\x12\x80"  # a field with wire type 7 and a truncated varint: no message


@pytest.fixture(scope="module")
def server() -> Any:
    with GrpcServerThread() as s:
        s.wait_ready()
        yield s


def _group_message(seed: int) -> pb.RolloutGroup:
    return convert.group_to_message(small_group(seed))


def _nan_heads() -> tuple[bytes, dict]:
    """options.heads = [[1, NaN]] (a Value list holding a NaN number) and its JSON twin."""
    request = pb.ReweightRequest(groups=[_group_message(1)])
    inner = request.options.heads.list_value.values.add().list_value
    inner.values.add().number_value = 1
    inner.values.add().number_value = float("nan")
    return request.SerializeToString(), {"groups": [small_group(1)], "options": {"heads": [[1, float("nan")]]}}


def _infinite_message_content() -> tuple[bytes, dict]:
    """messages = [{"role": "user", "content": Infinity}] in place of the prompt, and its JSON twin."""
    group = _group_message(2)
    group.ClearField("prompt")
    message = group.messages.add()
    message.fields["role"].string_value = "user"
    message.fields["content"].number_value = float("inf")
    twin = small_group(2)
    twin.pop("prompt")
    twin["messages"] = [{"role": "user", "content": float("inf")}]
    return pb.ReweightRequest(groups=[group]).SerializeToString(), {"groups": [twin]}


def _undecodable() -> tuple[bytes, bytes]:
    return GARBAGE, b"\xff{not json"


def _unary(server: GrpcServerThread, data: bytes) -> grpc.RpcError:
    call = server.channel().unary_unary(REWEIGHT)  # no serializers: bytes on the wire as they are
    with pytest.raises(grpc.RpcError) as info:
        call(data, timeout=60)
    return info.value


def _http_twin(server: GrpcServerThread, body: Any) -> dict:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    with server.client() as client:
        r = client.post("/v1/reweight", content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text[:300]
    return r.json()


@pytest.mark.parametrize("case", [_nan_heads, _infinite_message_content])
def test_a_non_finite_value_is_invalid_argument_like_its_http_twin(server: GrpcServerThread, case: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    data, twin = case()
    with caplog.at_level(logging.INFO):
        exc = _unary(server, data)
    problem, http = problem_of(exc), _http_twin(server, twin)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    assert (problem.type, problem.pointer, problem.status) == (http["type"], http["pointer"], http["status"])
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_bytes_that_are_no_message_are_invalid_argument(server: GrpcServerThread) -> None:
    data, twin = _undecodable()
    exc = _unary(server, data)
    http = _http_twin(server, twin)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    assert "DecodeError" not in (exc.details() or "")
    problem = problem_of(exc)
    assert problem.status // 100 == http["status"] // 100 == 4 and problem.pointer == http["pointer"] == ""


def _stream(server: GrpcServerThread, messages: list[bytes]) -> tuple[list[pb.ReweightStreamResult], Any]:
    call = server.channel().stream_stream(STREAM, response_deserializer=pb.ReweightStreamResult.FromString)
    results: list[pb.ReweightStreamResult] = []
    try:
        for result in call(iter(messages), timeout=60):
            results.append(result)
    except grpc.RpcError as exc:
        return results, exc
    return results, None


def test_a_non_finite_value_in_a_stream_is_that_groups_error_and_the_stream_goes_on(server: GrpcServerThread) -> None:
    heads, _ = _nan_heads()
    content, _ = _infinite_message_content()
    good = pb.ReweightRequest(groups=[_group_message(5)]).SerializeToString()
    results, error = _stream(server, [heads, good, content, good])
    assert error is None, (error.code(), error.details())
    by_request = {r.request_index: r for r in results}
    assert sorted(by_request) == [0, 1, 2, 3]
    bad_heads = convert.problem_from_message(by_request[0].result.error)
    assert (bad_heads.type.rsplit("/", 1)[-1], bad_heads.pointer) == ("validation", "/options/heads/0/1")
    bad_content = convert.problem_from_message(by_request[2].result.error)
    assert (bad_content.type.rsplit("/", 1)[-1], bad_content.pointer) == ("validation", "/groups/0/messages/0/content")
    for k in (1, 3):
        assert not by_request[k].result.HasField("error") and len(by_request[k].result.responses) == 3


def test_garbage_in_the_middle_of_a_stream_is_invalid_argument(server: GrpcServerThread,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    good = pb.ReweightRequest(groups=[_group_message(6)]).SerializeToString()
    with caplog.at_level(logging.INFO):
        _, error = _stream(server, [good, GARBAGE, good])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error and error.details()
    assert "DecodeError" not in (error.details() or "") and problem_of(error).status == 400
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
