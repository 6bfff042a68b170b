"""``AsyncGrpcClient``: ``GrpcClient``'s methods as coroutines, over grpc.aio, on the same
sans-I/O core (``kawhi_client.core``) and the same call mapping
(``kawhi_client.grpc.transport``) — replicas, failover, retries, the 413 split and the
eviction re-upload included.

    async with AsyncGrpcClient("kawhi:50051") as kawhi:
        results = await kawhi.reweight(groups)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2_grpc

from kawhi_client.actions import Call
from kawhi_client.drivers import AsyncDriver
from kawhi_client.grpc import transport
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc._proto import kawhi_pb2_grpc as pb_grpc
from kawhi_client.grpc.client import _GrpcBase, _stream_result
from kawhi_client.planning import GroupLike, OptionsLike
from kawhi_client.routing import GRPC_METADATA_KEY, request_routing_key
from kawhi_client.schema import GroupResult, ReweightResponse


class AsyncGrpcClient(_GrpcBase, AsyncDriver):
    """Asynchronous gRPC client of the KAWHI service (an async context manager); the
    arguments and methods of ``GrpcClient``, as coroutines. Its channels belong to the event
    loop of the first call."""

    def _open(self) -> None:
        self._channels: dict[str, tuple[grpc.aio.Channel, Any, Any]] = {}
        self._slots = asyncio.Semaphore(self._core.max_in_flight)

    def _stubs(self, endpoint: str | None) -> tuple[Any, Any]:
        target = transport.target_of(endpoint, self.target)
        if target not in self._channels:  # one event loop: no lock needed
            channel = (grpc.aio.secure_channel(target, self._credentials, options=self._channel_options)
                       if self._credentials is not None
                       else grpc.aio.insecure_channel(target, options=self._channel_options))
            self._channels[target] = (channel, pb_grpc.KawhiStub(channel), health_pb2_grpc.HealthStub(channel))
        _, stub, health = self._channels[target]
        return stub, health

    async def _send(self, call: Call) -> transport.GrpcReply:
        rpc = transport.rpc_of(call)
        stub, health = self._stubs(call.endpoint)
        meta, deadline = transport.metadata(call, self._metadata), transport.deadline(call)
        try:
            if rpc == "ready":
                answer = await health.Check(transport.health_request(), timeout=deadline, metadata=meta)
                if transport.serving(answer):
                    return transport.ready_reply()
                try:
                    await stub.Info(pb.InfoRequest(), timeout=deadline, metadata=meta)
                except grpc.RpcError as exc:
                    return transport.not_serving_reply(exc)
                return transport.not_serving_reply(None)
            if rpc == "info":
                return transport.info_reply(await stub.Info(pb.InfoRequest(), timeout=deadline, metadata=meta))
            if rpc == "image":
                answer = await stub.PutImage(transport.image_chunks(call.content), timeout=deadline, metadata=meta)
                return transport.image_reply(answer)
            return transport.GrpcReply(200, message=await stub.Reweight(call.content, timeout=deadline, metadata=meta))
        except grpc.RpcError as exc:
            return transport.reply_of_error(exc, rpc, transport.target_of(call.endpoint, self.target))

    # ------------------------------------------------------------------ API
    async def reweight(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                       per_group_errors: bool = False, request_id: str | None = None,
                       **option_kwargs: Any) -> list[GroupResult]:
        """See ``GrpcClient.reweight``."""
        resp = await self.reweight_response(groups, options=options, per_group_errors=per_group_errors,
                                            request_id=request_id, **option_kwargs)
        return resp.results

    async def reweight_response(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                                per_group_errors: bool = False, request_id: str | None = None,
                                **option_kwargs: Any) -> ReweightResponse:
        """See ``GrpcClient.reweight_response``."""
        return await self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    async def reweight_stream(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                              request_id: str | None = None,
                              **option_kwargs: Any) -> AsyncIterator[tuple[int, GroupResult]]:
        """See ``GrpcClient.reweight_stream`` (an async iterator)."""
        failed, todo, requests, endpoint, rid = await self._drive(
            self._stream_plan(groups, options, option_kwargs, request_id))
        for item in failed.items():
            yield item
        stub, _ = self._stubs(endpoint)
        meta = [*self._metadata, ("x-request-id", rid)]
        route = request_routing_key([g.route for g in todo])
        if route:
            meta.append((GRPC_METADATA_KEY, route))
        call = stub.ReweightStream(iter(requests), timeout=self._core.timeouts.read_timeout(sum(g.tokens for g in todo)),
                                   metadata=meta)
        try:
            async for answer in call:
                yield _stream_result(todo, answer)
        except grpc.RpcError as exc:
            raise transport.error_of(exc, "ReweightStream", transport.target_of(endpoint, self.target), rid) from None
        finally:
            call.cancel()

    async def upload_image(self, image: Any) -> str:
        """See ``GrpcClient.upload_image``."""
        return await self._drive(self._core.upload_image_job(image))

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        """See ``GrpcClient.info``."""
        return await self._drive(self._core.info_job(refresh))

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """See ``GrpcClient.wait_ready``."""
        return await self._drive(self._core.wait_ready_job(timeout))

    async def aclose(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel, _, _ in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
