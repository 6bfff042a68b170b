"""``GrpcClient`` and ``AsyncGrpcClient`` over three real ``kawhi serve`` replicas with gRPC
listeners (kawhi-tiny, loopback ports): every group's calls land on the replica rendezvous
hashing picks for its routing key (the same key and ranking as the HTTP client), and a
SIGSTOPped replica (hung, its TCP still accepting) is failed over after the failover
timeout — with the timeout off, every attempt waits out its whole deadline there. What each
replica saw is read from its own /metrics (``kawhi_routing_requests_total``). The harness
is bench/hung_replica.py (which records the times with the defaults in bench/README.md).
"""

from __future__ import annotations

import asyncio

import pytest
from kawhi_client import AsyncGrpcClient, GrpcClient, KawhiTimeout
from kawhi_client.replicas import rank

from bench.hung_replica import answer_with_owner_stopped, replica_id
from bench.replicas import key_of, replicas, scrape, workload

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three():
    with replicas(3, grpc=True) as servers:
        yield servers


def _owners(three, work) -> dict[str, int]:
    ids = [replica_id(s, "grpc") for s in three]
    expected = {s.url: 0 for s in three}
    for request in work:
        owner = rank(key_of(request), ids)[0]
        expected[next(s.url for s in three if replica_id(s, "grpc") == owner)] += 1
    return expected


def test_each_group_goes_to_its_rendezvous_owner(three) -> None:
    work = workload(6, 2, tag="grpc-spread-")
    before = {s.url: scrape(s.url) for s in three}
    with GrpcClient(replicas=[s.grpc_target for s in three], wait_ready=30) as client:
        for request in work:  # one sample per call, as a trainer sends them
            assert client.reweight([request])[0].id == request["id"]
        assert client.stats.failovers == 0
        assert client.replicas == tuple(s.grpc_target for s in three)
    expected = _owners(three, work[:6])  # each group's first sample is new on its owner ...
    for s in three:
        after = scrape(s.url)
        assert after.get("routing_new", 0) - before[s.url].get("routing_new", 0) == expected[s.url]
        # ... and its second sample is seen there again: no group touched another replica
        assert after.get("routing_seen", 0) - before[s.url].get("routing_seen", 0) == expected[s.url]


def test_a_stopped_replica_is_failed_over_after_the_failover_timeout(three) -> None:
    out = answer_with_owner_stopped(three, "grpc", "grpc-hung-", second_call=True, timeout=30, failover_timeout=2.0)
    print(f"gRPC, stopped replica, failover_timeout=2: {out}")
    assert out["outcome"] == "answered", out
    assert out["stats"]["replica_timeouts"] >= 1 and out["stats"]["failovers"] >= 1
    assert out["seconds"] < 15  # the full deadline (30 s) never elapsed
    # the stopped replica is skipped while it cools down: the next call to its key timed out nowhere
    assert out["stats"]["replica_timeouts"] == 1

    out = answer_with_owner_stopped(three, "grpc", "grpc-stuck-", timeout=4, failover_timeout=None, retries=1,
                                    backoff=0.0)
    print(f"gRPC, stopped replica, no failover timeout: {out}")
    assert out["outcome"] == KawhiTimeout.__name__, out
    assert out["stats"]["failovers"] == 0 and out["stats"]["replica_timeouts"] == 0
    assert out["seconds"] >= 8  # two attempts of 4 s, both on the stopped replica


async def _async_calls(three) -> tuple[list[str], dict[str, int]]:
    work = workload(3, 1, tag="grpc-async-")
    async with AsyncGrpcClient(replicas=[s.grpc_target for s in three], wait_ready=30) as client:
        results = await asyncio.gather(*(client.reweight([r]) for r in work))
        return [r[0].id for r in results], client.stats.snapshot()


def test_the_async_client_spreads_over_the_replicas(three) -> None:
    before = {s.url: scrape(s.url) for s in three}
    ids, stats = asyncio.run(_async_calls(three))
    work = workload(3, 1, tag="grpc-async-")
    assert ids == [r["id"] for r in work] and stats["failovers"] == 0
    expected = _owners(three, work)
    for s in three:
        assert scrape(s.url).get("routing_new", 0) - before[s.url].get("routing_new", 0) == expected[s.url]


async def _dns_round_trip(target: str) -> tuple[tuple[str, ...], str]:
    host, port = target.split(":")
    async with AsyncGrpcClient(replicas=f"dns+grpc://{host}:{port}", wait_ready=30) as client:
        result = (await client.reweight(workload(1, 1, tag="grpc-dns-")))[0]
        return client.replicas, result.id


def test_a_dns_name_of_grpc_replicas(three) -> None:
    """``dns+grpc://NAME:PORT`` is looked up (here to the one loopback address) as over HTTP."""
    target = three[0].grpc_target
    before = scrape(three[0].url)
    found, answered = asyncio.run(_dns_round_trip(target))
    assert found == (target,) and answered == "grpc-dns-g0.s0"
    assert scrape(three[0].url).get("routing_new", 0) - before.get("routing_new", 0) == 1
