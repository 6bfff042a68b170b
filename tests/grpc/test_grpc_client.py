"""``GrpcClient`` and ``AsyncGrpcClient`` on the shared sans-I/O core, against a real server
(kawhi-tiny behind uvicorn with the gRPC listener attached, real sockets): the async
client answers what the sync one and the HTTP client answer, an image the server evicted
is uploaded again and the call repeated, and each kind of failure reaches the core as the
HTTP client would see it (a transport failure as its httpx exception, our problem as its
HTTP status; RESOURCE_EXHAUSTED without RetryInfo as a 413: tests/grpc/test_grpc.py,
test_a_batch_larger_than_4_mib_and_the_http_body_limit)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import httpx
import pytest
from grpc_fixtures import GrpcServerThread, rpc_error
from kawhi_client import AsyncGrpcClient, Client, GrpcClient
from kawhi_client.grpc import convert, transport
from server_fixtures import small_group


@pytest.fixture(scope="module")
def server() -> Any:
    # 50 kB of image cache: three ~20 kB images evict the first
    with GrpcServerThread(cache_image_bytes=50_000) as s:
        s.wait_ready()
        yield s


def _noise_png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


async def _async_round_trip(target: str, groups: list[dict[str, Any]]) -> tuple[Any, list[tuple[int, Any]]]:
    async with AsyncGrpcClient(target, wait_ready=30, max_groups_per_request=2) as g:
        response = await g.reweight_response(groups, seed=3)
        streamed = [item async for item in g.reweight_stream(groups + [{"id": "bad"}], seed=3)]
        return response, streamed


def test_the_async_client_answers_what_the_sync_and_http_clients_answer(server: GrpcServerThread) -> None:
    groups = [small_group(60 + i) for i in range(3)]
    with GrpcClient(server.target, wait_ready=30) as g, Client(server.url, wait_ready=30) as h:
        want = g.reweight_response(groups, seed=3)
        over_http = h.reweight_response(groups, seed=3)
    got, streamed = asyncio.run(_async_round_trip(server.target, groups))
    assert got.model_dump(mode="json")["results"] == want.model_dump(mode="json")["results"]
    assert got.model_dump(mode="json")["results"] == over_http.model_dump(mode="json")["results"]
    assert got.usage.tokens == want.usage.tokens  # two calls (max_groups_per_request=2), usage summed
    by_index = dict(streamed)
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[3].error is not None and by_index[3].error.pointer.startswith("/groups/3")
    for i in range(3):
        assert by_index[i].model_dump(mode="json") == want.results[i].model_dump(mode="json")


def test_an_evicted_image_is_uploaded_again_sync_and_async(server: GrpcServerThread) -> None:
    a, b, c = (_noise_png(k) for k in range(3))
    assert all(15_000 < len(x) < 30_000 for x in (a, b, c))
    with GrpcClient(server.target, wait_ready=30) as g:
        for img in (a, b, c):
            g.upload_image(img)  # `a` is evicted by the time `c` is stored
        res = g.reweight([dict(small_group(70), image=a)])  # the client believes the server holds `a`
        assert res[0].error is None and g.stats.image_reuploads == 1
        for img in (b, c):
            g.upload_image(img)
        res = g.reweight([small_group(71), dict(small_group(72), image=a)], per_group_errors=True)
        assert [r.error for r in res] == [None, None] and g.stats.image_reuploads == 2

    async def run() -> int:
        async with AsyncGrpcClient(server.target, wait_ready=30) as ag:
            for img in (a, b, c):
                await ag.upload_image(img)
            res = await ag.reweight([dict(small_group(73), image=a)])
            assert res[0].error is None
            return ag.stats.image_reuploads

    assert asyncio.run(run()) == 1


def _reply(exc: grpc.RpcError, rpc: str = "reweight") -> Any:
    try:
        return transport.reply_of_error(exc, rpc, "t")
    except httpx.HTTPError as raised:
        return raised


def test_each_failure_reaches_the_core_as_the_http_client_sees_it(server: GrpcServerThread) -> None:
    stub = server.stub()
    # our problem: its HTTP status and body (an unknown image hash: 404 with the hash)
    missing = convert.request_to_message([dict(small_group(80), image={"sha256": "0" * 64})])
    reply = _reply(rpc_error(stub.Reweight, missing, timeout=30))
    assert reply.status_code == 404 and b"image-not-found" in reply.content
    # a peer that accepts TCP and never answers (a stopped process): the caller's deadline
    # without our details, or grpc's connect timeout before the HTTP/2 handshake: a read timeout
    import socket

    from kawhi_client.grpc._proto import kawhi_pb2_grpc

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody reads
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with grpc.insecure_channel(target) as channel:
            exc = rpc_error(kawhi_pb2_grpc.KawhiStub(channel).Info, convert.pb.InfoRequest(), timeout=0.5)
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert isinstance(_reply(exc, "info"), httpx.ReadTimeout)
        with grpc.insecure_channel(target, options=[("grpc.min_reconnect_backoff_ms", 300)]) as channel:
            exc = rpc_error(kawhi_pb2_grpc.KawhiStub(channel).Info, convert.pb.InfoRequest(), timeout=20)
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and "SETTINGS" in (exc.details() or "")
            assert isinstance(_reply(exc, "info"), httpx.ReadTimeout)
    # nothing listens: a connection error
    with grpc.insecure_channel("127.0.0.1:1") as dead:
        exc = rpc_error(kawhi_pb2_grpc.KawhiStub(dead).Info, convert.pb.InfoRequest(), timeout=5)
        assert isinstance(_reply(exc, "info"), httpx.ConnectError)


def test_a_draining_replica_is_failed_over_to_the_next(server: GrpcServerThread) -> None:
    """UNAVAILABLE with our problem (draining, RetryInfo) is the 503 of gRPC: the call moves
    at once to the key's next replica, which answers."""
    from kawhi_client.replicas import rank
    from kawhi_client.routing import group_routing_key

    with GrpcServerThread() as draining:
        draining.wait_ready()
        draining.state.begin_drain()  # what SIGTERM does first
        ids = [f"grpc://{t}" for t in (draining.target, server.target)]
        group = next(g for g in (small_group(90 + k) for k in range(50))
                     if rank(_route(g, group_routing_key), ids)[0] == ids[0])  # owned by the draining one
        with GrpcClient(replicas=[draining.target, server.target], wait_ready=False, backoff=0.0) as g:
            res = g.reweight([group])
            assert res[0].id == group["id"] and res[0].error is None
            assert g.stats.failovers >= 1 and g.stats.replica_timeouts == 0


def _route(group: dict[str, Any], key_of: Any) -> str:
    import base64
    import hashlib

    data = base64.b64decode(group["image"]["data"]) if isinstance(group["image"], dict) else group["image"]
    return key_of({**group, "image": {"sha256": hashlib.sha256(data).hexdigest()}})
