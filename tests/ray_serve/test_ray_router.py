"""The Ray Serve router's choice (kawhi.ray.router), without a cluster: where a key goes, what
moves when replicas leave or join, and where the key is read from (a handle call's keyword,
the header inside the request Ray's HTTP proxy sends). Replicas are stand-ins carrying only
the identity the router hashes (a RunningReplica needs a live actor)."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="kawhi-rl[ray] is not installed")

from kawhi.ray.router import OWNER_TURNS, RendezvousRouter, preference, routing_key_of
from kawhi_client.integrations.ray_backend import group_key
from kawhi_client.replicas import rank
from kawhi_client.routing import routing_key
from ray.serve._private.common import (
    DeploymentID,
    ReplicaID,
    RequestMetadata,
    RequestProtocol,
    StreamingHTTPRequest,
)
from ray.serve.request_router import PendingRequest

KEYS = [routing_key(hashlib.sha256(str(i).encode()).hexdigest(), f"prompt {i}") for i in range(300)]


def replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(name, DeploymentID("kawhi", "kawhi")))


def owners(names: list[str]) -> dict[str, str]:
    replicas = [replica(n) for n in names]
    return {k: preference(k, replicas)[0].replica_id.unique_id for k in KEYS}


def request(*args: object, http: bool = False, **kwargs: object) -> PendingRequest:
    meta = RequestMetadata("r", "ir", _request_protocol=RequestProtocol.HTTP if http else RequestProtocol.UNDEFINED)
    return PendingRequest(list(args), kwargs, meta)


def test_the_order_is_the_sdks_rendezvous_rank_over_replica_ids() -> None:
    replicas = [replica(n) for n in ("a1", "b2", "c3")]
    for key in KEYS[:20]:
        assert [r.replica_id.unique_id for r in preference(key, replicas)] == rank(key, ["a1", "b2", "c3"])


def test_keys_move_only_when_membership_changes() -> None:
    before = owners(["a", "b", "c"])
    assert owners(["c", "a", "b"]) == before  # the order Ray lists replicas in does not matter
    after_leave = owners(["a", "c"])
    moved = {k for k in KEYS if after_leave[k] != before[k]}
    assert moved == {k for k in KEYS if before[k] == "b"}  # only the leaver's keys move
    after_join = owners(["a", "b", "c", "d"])
    assert all(after_join[k] in (before[k], "d") for k in KEYS)  # a joiner only takes keys
    assert 40 < sum(after_join[k] == "d" for k in KEYS) < 110  # about a quarter


def test_the_key_comes_from_the_handle_keyword_or_the_http_header() -> None:
    asyncio.run(_key_checks())  # a PendingRequest holds a future: built in a running loop


async def _key_checks() -> None:
    key = KEYS[0]
    assert routing_key_of(request(["groups"], routing_key=key)) == key
    assert routing_key_of(request(["groups"], routing_key="not-a-key")) is None
    assert routing_key_of(request(["groups"])) is None
    scope = {"type": "http", "headers": [(b"content-type", b"application/json"), (b"x-kawhi-routing-key", key.encode())]}
    proxied = pickle.dumps(StreamingHTTPRequest(scope, proxy_actor_name="proxy"))
    assert routing_key_of(request(proxied, http=True)) == key
    assert routing_key_of(request(pickle.dumps(StreamingHTTPRequest({"type": "http", "headers": []},
                                                                    proxy_actor_name="p")), http=True)) is None
    assert routing_key_of(request(b"not a pickle", http=True)) is None


def test_choose_replicas_ranks_one_replica_per_rank() -> None:
    replicas = [replica(n) for n in ("a", "b", "c")]

    async def choose(**kwargs: object) -> list:  # a PendingRequest holds a future: built in a loop
        return await RendezvousRouter.choose_replicas(None, replicas, request(**kwargs))  # type: ignore[arg-type]

    async def pending_after_choice() -> PendingRequest:
        pending = request(routing_key=KEYS[1])
        await RendezvousRouter.choose_replicas(None, replicas, pending)  # type: ignore[arg-type]
        return pending

    assert asyncio.run(pending_after_choice()).routing_context.should_backoff  # all full: back off, no busy loop
    async def turns(n: int) -> list:  # the same request asked about n times (Ray's routing turns)
        pending = request(routing_key=KEYS[1])
        return [await RendezvousRouter.choose_replicas(None, replicas, pending) for _ in range(n)]  # type: ignore[arg-type]

    order = rank(KEYS[1], ["a", "b", "c"])
    *first, then = asyncio.run(turns(OWNER_TURNS + 1))
    assert all([[r.replica_id.unique_id for r in rank_] for rank_ in ranks] == [[order[0]]] for ranks in first)
    assert [r[0].replica_id.unique_id for r in then] == order  # then every replica, in the key's order
    assert all(len(r) == 1 for r in then)
    unkeyed = asyncio.run(choose())
    assert len(unkeyed) == 1 and len(unkeyed[0]) == 2  # two choices, as Ray's default


def test_the_backend_key_is_the_sdks_key() -> None:
    image = b"\x89PNG fake bytes"
    sha = hashlib.sha256(image).hexdigest()
    assert group_key({"image": image, "prompt": "q"}) == routing_key(sha, "q")
    assert group_key({"image": {"sha256": sha}, "prompt": "q"}) == routing_key(sha, "q")
    messages = [{"role": "user", "content": "q"}]
    assert group_key({"image": image, "messages": messages}) == routing_key(sha, None, messages)
    assert group_key({"image": {"data": "aGk="}, "prompt": "q"}) is None
