"""grpc.health.v1.Health mirroring ``/readyz``: SERVING while ready (or degraded: Redis down,
serving from memory), NOT_SERVING while loading, draining or failed.

The service names answered are "" (the server) and ``kawhi.v1.Kawhi``; any other is
NOT_FOUND, as the protocol says. ``Watch`` sends the status at once and again each
time the server's phase changes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kawhi.pipeline.service import ReweightService

SERVICES = ("", "kawhi.v1.Kawhi")
WATCH_POLL_S = 0.1


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, state: ReweightService) -> None:
        self.state = state

    def status(self) -> Any:
        phase, _reasons = self.state.readiness()
        if phase in ("ready", "degraded"):
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service; this server reports 'kawhi.v1.Kawhi' and '' (the server as a whole)")
        return health_pb2.HealthCheckResponse(status=self.status())

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.service not in SERVICES:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            now = self.status()
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
            await asyncio.sleep(WATCH_POLL_S)
