"""Every kind of the error catalogue survives the trip through a google.rpc.Status: the code is the
catalogue's, the problem comes back whole, the pointer is a BadRequest field violation, and a
retry delay is a RetryInfo exactly when waiting can help."""

from __future__ import annotations

import pytest

grpc = pytest.importorskip("grpc", reason="the gRPC tests need the [grpc] extra")

from grpc_status import rpc_status  # noqa: E402
from kawhi.errors import CATALOGUE, KawhiError  # noqa: E402
from kawhi_client.errors import error_class  # noqa: E402
from kawhi_client.grpc.status import problem_from_status, retry_delay, status_for, unpack_details  # noqa: E402
from kawhi_client.schema import Problem  # noqa: E402


@pytest.mark.parametrize("slug", sorted(s for s in CATALOGUE if s != "client-closed"))
def test_each_kind_round_trips_through_a_status(slug: str) -> None:
    kind = CATALOGUE[slug]
    headers = {"Retry-After": "3"} if kind.http in (429, 503) else {}
    err = KawhiError(slug, "what went wrong", "/groups/2/responses/0/reward" if kind.http in (404, 413, 422) else "",
                     headers=headers, **({"sha256": "ab" * 32} if slug == "image-not-found" else {}))
    problem = Problem.model_validate({**err.to_problem(), "request_id": "r1"})
    code = getattr(grpc.StatusCode, err.grpc_code)
    status = rpc_status.to_status(status_for(problem, float(headers["Retry-After"]) if headers else None, code))
    assert status.code == code
    # what the client sees: the trailing metadata carries the status proto
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    from google.rpc import status_pb2

    proto = status_pb2.Status.FromString(details)
    back = problem_from_status(code, status.details, proto)
    assert back.model_dump() == problem.model_dump()
    found = unpack_details(proto)
    assert found["info"].reason == slug and found["info"].domain == "kawhi.dev"
    if problem.pointer:
        assert [v.field for v in found["bad_request"].field_violations] == [problem.pointer]
    else:
        assert "bad_request" not in found
    assert retry_delay(proto) == (3.0 if headers else None)
    assert error_class(back.status, back) is error_class(kind.http, problem)  # the exception Client raises


def test_statuses_without_our_details_get_the_http_status_of_their_code() -> None:
    assert problem_from_status(grpc.StatusCode.UNAVAILABLE, "connection refused", None).status == 503
    assert problem_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max", None).status == 413
    assert problem_from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "", None).status == 504
    assert problem_from_status(grpc.StatusCode.UNAUTHENTICATED, "", None).status == 401


def test_a_transport_failure_is_retried_then_a_connection_error() -> None:
    import socket

    from kawhi_client import GrpcClient
    from kawhi_client.errors import KawhiConnectionError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with GrpcClient(f"127.0.0.1:{port}", wait_ready=False, retries=2, backoff=0.01, timeout=5) as g:
        with pytest.raises(KawhiConnectionError) as info:
            g.info()
        assert info.value.attempts == 3 and g.stats.snapshot()["retries"] == 2
