"""Hostile kawhi.v1 clients over a real grpc channel (issue 26.4, 26.5): a non-finite number
inside a google.protobuf.Value, bytes that are no message at all, garbage in the middle of a
stream, a stream message over the unary group limit, a stalled upload, a stream whose results
are never read, a stream cancelled half way.

Each is sent as bytes through a generic call (``channel.unary_unary`` / ``stream_stream``
without a serializer), as a hostile client would, and each has an HTTP twin: the same
mistake in a JSON body. The gRPC answer must be the twin's: the same problem type and
pointer, and a 4xx kind (INVALID_ARGUMENT), never INTERNAL or UNKNOWN; inside a stream it
is that group's error and the stream goes on.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from typing import Any

import grpc
import pytest
from grpc_fixtures import GrpcServerThread, problem_of
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from server_fixtures import metric, small_group

REWEIGHT = "/kawhi.v1.Kawhi/Reweight"
STREAM = "/kawhi.v1.Kawhi/ReweightStream"
GARBAGE = b"\xff\xff\xff\xff\x0f\x12\x80"  # a field with wire type 7 and a truncated varint: no message
WINDOW = 4  # stream_window_groups of the server here
BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server() -> Any:
    with GrpcServerThread(stream_window_groups=WINDOW, body_timeout_s=BODY_TIMEOUT_S) as s:
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


def test_a_stream_message_over_the_group_limit_is_refused_like_a_unary_call(server: GrpcServerThread) -> None:
    limit = server.settings.max_groups
    message = pb.ReweightRequest(groups=[_group_message(1000 + i) for i in range(limit + 1)])
    before = _groups_run(server)
    unary = _unary(server, message.SerializeToString())
    _, error = _stream(server, [message.SerializeToString()])
    assert error is not None and error.code() == unary.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    streamed, called = problem_of(error), problem_of(unary)
    assert (streamed.type, streamed.pointer, streamed.detail) == (called.type, "/groups", called.detail)
    assert _groups_run(server) == before


def test_a_stalled_upload_is_cut_after_body_timeout_s(server: GrpcServerThread) -> None:
    """Issue 26.5: one chunk, then nothing: the server ends the call (its own problem, not the
    client's deadline) as HTTP answers a stalled body 408."""
    release = threading.Event()

    def chunks() -> Any:
        yield pb.ImageChunk(data=b"\x89PNG\r\n\x1a\n")
        release.wait(60)  # the client holds the stream open and sends nothing more

    try:
        with pytest.raises(grpc.RpcError) as info:
            server.stub().PutImage(chunks(), timeout=20 * BODY_TIMEOUT_S)
    finally:
        release.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    problem = problem_of(info.value)
    assert problem.type.endswith("/request-timeout") and problem.status == 408, problem


def _groups_run(server: GrpcServerThread) -> float:
    with server.client() as c:
        return metric(c.get("/metrics").text, "kawhi_groups_total")


def _settled_groups(server: GrpcServerThread, above: float, quiet_s: float = 3.0) -> float:
    """kawhi_groups_total once it is over ``above`` and the server has held still (no group
    queued, none running, the count unchanged) for ``quiet_s``: what an unread stream got computed."""
    deadline = time.monotonic() + 180
    last, since = -1.0, time.monotonic()
    while True:
        with server.client() as c:
            text = c.get("/metrics").text
        count = metric(text, "kawhi_groups_total")
        busy = metric(text, "kawhi_queue_depth") > 0 or (server.state.batcher is not None and server.state.batcher.busy)
        if count != last or busy or count <= above:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return count
        assert time.monotonic() < deadline, "the server never held still"
        time.sleep(0.1)


def test_an_unread_stream_is_not_computed_ahead_of_its_reader(server: GrpcServerThread) -> None:
    """Issue 26.5: 120 groups sent, no result read: the server computes its window of groups
    plus what the client's HTTP/2 receive window takes in, then stops reading the stream.

    The client here advertises a fixed 8 KiB window (no BDP probing: grpc's default grows the
    window on loopback to hold hundreds of these 1.1 KB results, which no server can tell apart
    from a client reading them; docs/operations.md)."""
    sent = 120
    before = _groups_run(server)
    messages = [pb.ReweightRequest(groups=[_group_message(2000 + 10 * m + j) for j in range(10)]) for m in range(12)]
    channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0),
                                                            ("grpc.http2.lookahead_bytes", 8192)])
    call = channel.stream_stream(STREAM)(iter(m.SerializeToString() for m in messages), timeout=300)
    try:
        computed = _settled_groups(server, above=before) - before
    finally:
        call.cancel()
        channel.close()
    buffered = 8192 // 1000 + 1  # results the client's window takes in
    assert 0 < computed <= WINDOW + buffered, f"{computed:g} of {sent} groups computed for a stream nobody reads"


def test_a_cancelled_stream_logs_no_error(server: GrpcServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26.5: a stream cancelled with groups in flight, or past its deadline, ends quietly
    (it used to leave asyncio's "Task exception was never retrieved" at error level: the
    request id's ContextVar reset failing in the generator's finalizer, another Context)."""
    release = threading.Event()

    def messages(n: int, hold: bool) -> Any:
        for m in range(n):
            yield pb.ReweightRequest(groups=[_group_message(3000 + 10 * m + j) for j in range(10)])
        if hold:
            release.wait(60)

    def settle() -> None:
        release.set()
        deadline = time.monotonic() + 30
        while server.state.active:  # the call's cleanup ran
            assert time.monotonic() < deadline, "the cancelled stream is still counted in flight"
            time.sleep(0.05)
        release.clear()

    stub = server.stub()
    with caplog.at_level(logging.INFO):
        call = stub.ReweightStream(messages(5, hold=False), timeout=120)
        time.sleep(0.3)  # groups in flight, no result yet
        call.cancel()
        settle()
        call = stub.ReweightStream(messages(2, hold=True), timeout=120)
        next(call)
        call.cancel()
        settle()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ReweightStream(messages(3, hold=True), timeout=0.5))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        settle()
        time.sleep(1)
        gc.collect()  # a task whose exception nobody retrieved is reported when it is collected
    errors = [(r.getMessage()[:300], repr(r.exc_info and r.exc_info[1])) for r in caplog.records
              if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, errors
