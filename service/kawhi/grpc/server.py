"""The gRPC listener next to the HTTP one, on the same event loop and ``ServerState``.

``attach(app)`` wraps the FastAPI app's lifespan: once the state is up (caches
connected, engine loading or ready) the gRPC server binds ``host:grpc_port`` (0 = any
free port; the bound port is ``GrpcFrontEnd.port``); on shutdown it stops after the
HTTP drain (``kawhi serve``'s SIGTERM handling waits for gRPC calls too, they count
as in flight), before the batcher stops.

Message size limits are the HTTP ones: a request may be ``max_body_bytes``; an
answer may be as large as the per-token results of ``max_request_tokens`` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc._proto import kawhi_pb2_grpc as pb_grpc

from kawhi.grpc.health import HealthServicer
from kawhi.grpc.servicer import KawhiServicer
from kawhi.server.state import ServerState

log = logging.getLogger("kawhi.server.grpc")

# Bytes of a serialised answer per response token: two packed doubles (token_advantages,
# token_weights) plus room for paragraphs and framing.
ANSWER_BYTES_PER_TOKEN = 24
STOP_GRACE_S = 5.0


def channel_options(settings: Any) -> list[tuple[str, Any]]:
    """The server's message limits (see the module doc) and keepalive policy."""
    receive = int(settings.max_body_bytes)
    send = max(receive, ANSWER_BYTES_PER_TOKEN * int(settings.max_request_tokens))
    return [
        ("grpc.max_receive_message_length", receive),
        ("grpc.max_send_message_length", send),
        ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class GrpcFrontEnd:
    """The gRPC server of one ServerState."""

    def __init__(self, state: ServerState, host: str | None = None, port: int | None = None) -> None:
        self.state = state
        self.host = host if host is not None else state.settings.host
        self.requested_port = port if port is not None else state.settings.grpc_port
        self.port: int | None = None
        self.server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(options=channel_options(self.state.settings))
        pb_grpc.add_KawhiServicer_to_server(KawhiServicer(self.state), server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(self.state), server)
        names = (
            pb.DESCRIPTOR.services_by_name["Kawhi"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = server.add_insecure_port(f"{host}:{self.requested_port}")
        if not port:
            raise RuntimeError(f"gRPC could not bind {self.host}:{self.requested_port}")
        await server.start()
        self.server, self.port = server, port
        log.info("grpc listening", extra={"host": self.host, "port": port})

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        if self.server is not None:
            await self.server.stop(grace)
            self.server = None


def attach(app: Any, *, host: str | None = None, port: int | None = None) -> GrpcFrontEnd:
    """Serve gRPC for this FastAPI app while it runs (see the module doc)."""
    front = GrpcFrontEnd(app.state.kawhi, host, port)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as value:
            await front.start()
            try:
                yield value
            finally:
                await front.stop()

    app.router.lifespan_context = lifespan
    return front
