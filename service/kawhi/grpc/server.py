"""The gRPC listener next to the HTTP one, on the same event loop and ``ReweightService``.

``attach(app, service)`` (called by the composition root, kawhi.serve) wraps an ASGI
app's lifespan: once the service is up (caches connected, engine loading or ready)
the gRPC server binds ``host:grpc_port`` (0 = any
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

from kawhi.grpc.health import HealthServicer
from kawhi.grpc.messages import decoder
from kawhi.grpc.servicer import SERVICE, KawhiServicer
from kawhi.pipeline.service import ReweightService

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


def _message_or_bytes(message: Any) -> bytes:
    """A Reweight answer on the wire: the servicer hands the serialised message (the bytes the
    idempotent store holds too), so it is serialised once; a message still works."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_servicer(servicer: KawhiServicer, server: grpc.aio.Server) -> None:
    """``kawhi_pb2_grpc.add_KawhiServicer_to_server``, with Reweight answering bytes as they are and
    requests that are no message handed over as ``Undecodable`` (answered INVALID_ARGUMENT)."""
    from google.protobuf import struct_pb2

    handlers = {
        "Reweight": grpc.unary_unary_rpc_method_handler(
            servicer.Reweight, request_deserializer=decoder(pb.ReweightRequest),
            response_serializer=_message_or_bytes),
        "ReweightStream": grpc.stream_stream_rpc_method_handler(
            servicer.ReweightStream, request_deserializer=decoder(pb.ReweightRequest),
            response_serializer=pb.ReweightStreamResult.SerializeToString),
        "PutImage": grpc.stream_unary_rpc_method_handler(
            servicer.PutImage, request_deserializer=decoder(pb.ImageChunk),
            response_serializer=pb.ImageInfo.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=decoder(pb.InfoRequest),
            response_serializer=struct_pb2.Struct.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class GrpcFrontEnd:
    """The gRPC server of one ReweightService."""

    def __init__(self, state: ReweightService, host: str | None = None, port: int | None = None) -> None:
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
        add_servicer(KawhiServicer(self.state), server)
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


def attach(app: Any, service: ReweightService, *, host: str | None = None, port: int | None = None) -> GrpcFrontEnd:
    """Serve gRPC over ``service`` while the ASGI ``app`` runs (see the module doc)."""
    front = GrpcFrontEnd(service, host, port)
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
