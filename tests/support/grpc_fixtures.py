"""Fixtures for the gRPC tests: ServerThread with the gRPC front end attached (real sockets)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("grpc", reason="the gRPC tests need the [grpc] extra (bash scripts/setup.sh installs it)")

import grpc
from grpc_status import rpc_status
from server_fixtures import ServerThread


class GrpcServerThread(ServerThread):
    """create_app + attach (the gRPC listener on a free port) under a real uvicorn, in a thread."""

    def __init__(self, engine: Any = "default", **overrides: Any) -> None:
        overrides.setdefault("grpc_port", 0)
        super().__init__(engine, **overrides)
        from kawhi.grpc.server import attach

        self.front = attach(self.app, self.app.state.kawhi)

    @property
    def target(self) -> str:
        return self.front.target

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", -1),
                                                           ("grpc.max_send_message_length", -1)])

    def stub(self) -> Any:
        from kawhi_client.grpc._proto import kawhi_pb2_grpc

        return kawhi_pb2_grpc.KawhiStub(self.channel())


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The RpcError the call raises (fails the test if it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


def violations(exc: grpc.RpcError) -> list[str]:
    """The JSON pointers of the google.rpc.BadRequest field violations in a status."""
    from kawhi_client.grpc.status import unpack_details

    bad = unpack_details(rpc_status.from_call(exc)).get("bad_request")
    return [v.field for v in bad.field_violations] if bad is not None else []


def problem_of(exc: grpc.RpcError) -> Any:
    from kawhi_client.grpc.status import problem_from_status

    return problem_from_status(exc.code(), exc.details() or "", rpc_status.from_call(exc))


def retry_after(exc: grpc.RpcError) -> float | None:
    from kawhi_client.grpc.status import retry_delay

    return retry_delay(rpc_status.from_call(exc))
