"""Group affinity across replicas, without a network: the routing key, rendezvous
hashing, and the client's jobs against a scripted set of replicas on a fake clock
(replicas that die, answer 503/429, come back, or leave the DNS answer).

Three real `kawhi serve` replicas are in test_client_replicas.py.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import httpx
import pytest
from kawhi_client import Client, KawhiConnectionError, KawhiTimeout, Limits
from kawhi_client.affinity import HUNG_COOLDOWN_S
from kawhi_client.core import Call, Core, Lookup, Parallel, Sleep, resume
from kawhi_client.planning import IMAGE_TOKENS_ESTIMATE
from kawhi_client.replicas import ReplicaSet, rank
from kawhi_client.routing import GRPC_METADATA_KEY, ROUTING_HEADER, ROUTING_KEY_RE, group_routing_key, routing_key

PNGS = [b"\x89PNG\r\n\x1a\n" + bytes([i]) * 40 for i in range(3)]
SHAS = [hashlib.sha256(p).hexdigest() for p in PNGS]
INFO = {"model": "m", "version": "v", "limits": {"max_groups": 4, "max_body_bytes": 10**6,
                                                   "max_request_tokens": 10**6}, "server": {"queue_groups": 100}}


# ====================================================================== the key


def test_routing_key_names_the_prefix_and_nothing_else() -> None:
    k = routing_key(SHAS[0], "How many bars?")
    assert ROUTING_KEY_RE.match(k)
    assert k == routing_key(SHAS[0].upper(), "How many bars?")  # hex case does not matter
    assert k != routing_key(SHAS[1], "How many bars?")  # another image
    assert k != routing_key(SHAS[0], "How many bars")  # another prompt
    m1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    m2 = [{"content": [{"type": "image"}, {"text": "hi", "type": "text"}], "role": "user"}]
    assert routing_key(SHAS[0], messages=m1) == routing_key(SHAS[0], messages=m2)  # canonical JSON
    assert routing_key(SHAS[0], messages=m1) != routing_key(SHAS[0], "hi")
    # from a wire group: the responses, rewards and options are not part of it
    g = {"image": {"sha256": SHAS[0]}, "prompt": "How many bars?", "responses": [{"text": "3", "reward": 1.0}]}
    assert group_routing_key(g) == k
    assert group_routing_key({**g, "responses": [{"text": "4", "reward": 0.0}]}) == k
    assert group_routing_key({"image": {"data": "AAAA"}, "prompt": "x"}) is None
    assert ROUTING_HEADER.lower() == GRPC_METADATA_KEY


def test_rendezvous_moves_only_the_keys_of_a_replica_that_leaves() -> None:
    replicas = [f"http://10.0.0.{i}:8000" for i in range(1, 6)]
    keys = [routing_key(SHAS[0], f"prompt {i}") for i in range(3000)]
    owner = {k: rank(k, replicas)[0] for k in keys}
    share = Counter(owner.values())
    assert set(share) == set(replicas)
    assert all(abs(n - 600) < 150 for n in share.values()), share  # balanced: 3000 keys / 5
    gone = replicas[2]
    left = [r for r in replicas if r != gone]
    for k in keys:
        new = rank(k, left)[0]
        if owner[k] != gone:
            assert new == owner[k]  # nobody else's key moves
        else:
            assert new == rank(k, replicas)[1]  # each moves to its own second choice
    moved = Counter(rank(k, left)[0] for k in keys if owner[k] == gone)
    assert len(moved) == 4  # ... spread over all the others, not piled on one


def test_replica_specs() -> None:
    assert ReplicaSet(["http://a:1/", "http://b:2", "http://a:1"]).urls == ("http://a:1", "http://b:2")
    assert ReplicaSet("http://a:1, http://b:2").urls == ("http://a:1", "http://b:2")
    dns = ReplicaSet("dns+http://kawhi-headless.ml.svc:8000")
    assert dns.dns is not None and (dns.dns.host, dns.dns.port) == ("kawhi-headless.ml.svc", 8000)
    assert dns.urls == ()
    assert dns.update(["10.0.0.2", "fd00::1"], 0.0) == ({"http://10.0.0.2:8000", "http://[fd00::1]:8000"}, set())
    for bad in ([], "a:1", "dns+ftp://x:1", "dns+http://:80"):
        with pytest.raises(ValueError):
            ReplicaSet(bad)


# ====================================================================== scripted replicas


class Replica:
    """One scripted replica: holds images, answers reweights, or fails as told."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.images: set[str] = set()
        self.fail: Any | None = None  # an exception to raise, or (status, headers) to answer
        self.hung = False  # accepts the connection, never answers (the World lets the timeout pass)
        self.calls: list[Call] = []

    def handle(self, call: Call) -> httpx.Response:
        self.calls.append(call)
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail is not None:
            status, headers = self.fail
            return _response(status, {"type": "x", "title": "t", "status": status, "detail": "d"}, headers)
        if call.path == "/readyz":
            return _response(200, {"state": "ready", "reasons": []})
        if call.path == "/v1/info":
            return _response(200, INFO)
        if call.path == "/v1/images":
            sha = hashlib.sha256(call.content or b"").hexdigest()
            self.images.add(sha)
            return _response(200, {"sha256": sha})
        groups = json.loads(call.content or b"{}")["groups"]
        for i, g in enumerate(groups):
            if g["image"]["sha256"] not in self.images:
                return _response(404, {"type": "https://kawhi.dev/problems/image-not-found", "title": "t",
                                       "status": 404, "detail": "d", "pointer": f"/groups/{i}/image/sha256",
                                       "sha256": g["image"]["sha256"]})
        results = [{"id": g.get("id"), "responses": [{"advantage": 1.0, "paragraphs": [], "token_advantages": [1.0],
                                                      "token_weights": [1.0]}]} for g in groups]
        return _response(200, {"model": "m", "version": "v", "options": {}, "usage": {"tokens": 1, "milliseconds": 1},
                               "results": results})

    def reweights(self) -> list[Call]:
        return [c for c in self.calls if c.path == "/v1/reweight"]


def _response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    ctype = "application/problem+json" if status >= 400 else "application/json"
    return httpx.Response(status, headers={"content-type": ctype, **(headers or {})}, content=json.dumps(body).encode(),
                          request=httpx.Request("GET", "http://x/"))


class World:
    """Drives a job: each Call goes to the replica its endpoint names; Lookup answers
    ``dns``; Sleep advances the fake clock."""

    def __init__(self, core: Core, replicas: list[Replica], dns: list[str] | None = None) -> None:
        self.now = 0.0
        core.clock = lambda: self.now
        core.wallclock = lambda: 1_700_000_000.0 + self.now
        self.by_url = {r.url: r for r in replicas}
        self.dns = dns
        self.sleeps: list[float] = []
        self.lookups = 0

    def run(self, job: Any) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            done, action = resume(job, value, error)
            if done:
                return action
            value, error = None, None
            try:
                if isinstance(action, Call):
                    assert action.endpoint is not None, "with replicas every call names its replica"
                    replica = self.by_url[action.endpoint]
                    if replica.hung:  # a fake of a stopped process (the real one: test_client_replicas.py)
                        replica.calls.append(action)
                        self.now += action.timeout.read
                        raise httpx.ReadTimeout("timed out")
                    value = replica.handle(action)
                elif isinstance(action, Lookup):
                    self.lookups += 1
                    if self.dns is None:
                        raise OSError("no such host")
                    value = list(self.dns)
                elif isinstance(action, Sleep):
                    self.sleeps.append(action.seconds)
                    self.now += action.seconds
                else:
                    assert isinstance(action, Parallel)
                    value = [self.run(j) for j in action.jobs]
            except Exception as exc:
                error = exc


class FirstRng:
    def uniform(self, a: float, b: float) -> float:
        return b


def make_core(replicas: Any, **kw: Any) -> Core:
    """A real Client's core, with /v1/info already read (so every call is the test's)."""
    client = Client(replicas=replicas, wait_ready=False, retries=4, max_in_flight=2, **kw)
    client.close()
    core = Core(client.config, rng=FirstRng())
    core.info, core.limits = INFO, Limits.from_info(INFO)
    return core


def groups(n: int, images: int = 3) -> list[dict[str, Any]]:
    return [{"id": f"g{i}", "image": PNGS[i % images], "prompt": f"question {i}",
             "responses": [{"text": "a", "reward": 1.0}]} for i in range(n)]


def key_of(g: dict[str, Any]) -> str:
    return routing_key(hashlib.sha256(g["image"]).hexdigest(), g["prompt"])


URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]


def test_each_request_goes_to_its_groups_owner_and_images_follow_them() -> None:
    core = make_core(URLS)
    reps = [Replica(u) for u in URLS]
    world = World(core, reps)
    batch = groups(24)
    out = world.run(core.reweight_job(batch, None, {}, False, "step-1"))
    assert [r.id for r in out.results] == [g["id"] for g in batch]
    owner = {g["id"]: rank(key_of(g), URLS)[0] for g in batch}
    assert len(set(owner.values())) == 3  # the 24 groups spread over the 3 replicas
    for rep in reps:
        for call in rep.reweights():
            sent = json.loads(call.content)["groups"]
            assert {owner[g["id"]] for g in sent} == {rep.url}  # every group of a request is owned here
            assert call.headers[ROUTING_HEADER] == routing_key(sent[0]["image"]["sha256"], sent[0]["prompt"])
        # each image went exactly to the replicas whose groups use it
        used = {hashlib.sha256(g["image"]).hexdigest() for g in batch if owner[g["id"]] == rep.url}
        assert rep.images == used
        assert len([c for c in rep.calls if c.path == "/v1/images"]) == len(used)
    assert core.stats.failovers == 0 and world.sleeps == []
    # the next step with the same prompts: the same replicas, no upload
    uploads = [len([c for c in r.calls if c.path == "/v1/images"]) for r in reps]
    served = [len(r.reweights()) for r in reps]
    world.run(core.reweight_job(batch, None, {}, False, "step-2"))
    assert [len([c for c in r.calls if c.path == "/v1/images"]) for r in reps] == uploads
    assert [len(r.reweights()) for r in reps] == [2 * n for n in served]


def test_a_shared_image_store_gets_each_image_once() -> None:
    core = make_core(URLS, shared_image_cache=True)
    reps = [Replica(u) for u in URLS]
    shared: set[str] = set()
    for r in reps:
        r.images = shared  # one Redis behind all three
    world = World(core, reps)
    world.run(core.reweight_job(groups(24), None, {}, False, None))
    assert sum(len([c for c in r.calls if c.path == "/v1/images"]) for r in reps) == 3


def test_a_dead_replica_fails_over_at_once_and_gets_its_keys_back_when_it_returns() -> None:
    core = make_core(URLS)
    reps = {u: Replica(u) for u in URLS}
    world = World(core, list(reps.values()))
    g = groups(1)[0]
    first, second = rank(key_of(g), URLS)[:2]
    world.run(core.reweight_job([g], None, {}, False, None))
    assert len(reps[first].reweights()) == 1

    reps[first].fail = httpx.ConnectError("connection refused")
    out = world.run(core.reweight_job([g], None, {}, False, "r2"))
    assert out.results[0].id == "g0"
    assert world.sleeps == [] and core.stats.failovers == 1  # no backoff wait before the next replica
    # the next replica did not hold the image: uploaded there once, then served there
    assert [c.path for c in reps[second].calls] == ["/v1/reweight", "/v1/images", "/v1/reweight"]
    assert all(c.headers["X-Request-ID"] == "r2" for c in reps[second].reweights())

    # while it cools down the dead replica is not even tried
    n = len(reps[first].calls)
    world.run(core.reweight_job([g], None, {}, False, None))
    assert len(reps[first].calls) == n and len(reps[second].reweights()) == 3

    # back after the cooldown: the key returns to its first choice (no stickiness)
    reps[first].fail = None
    world.now += 60
    world.run(core.reweight_job([g], None, {}, False, None))
    assert len(reps[first].reweights()) == 3 and len(reps[second].reweights()) == 3  # 3: the refused one too


@pytest.mark.parametrize("status", [503, 429])
def test_503_and_429_send_the_request_to_the_next_replica_for_the_retry_after(status: int) -> None:
    core = make_core(URLS)
    reps = {u: Replica(u) for u in URLS}
    world = World(core, list(reps.values()))
    g = groups(1)[0]
    first, second = rank(key_of(g), URLS)[:2]
    reps[first].fail = (status, {"Retry-After": "5"})
    world.run(core.reweight_job([g], None, {}, False, None))
    # the upload came first: it failed over, so the image is where the request goes next
    assert [c.path for c in reps[first].calls] == ["/v1/images"]
    assert [c.path for c in reps[second].calls] == ["/v1/images", "/v1/reweight"]
    assert core.stats.failovers == 1 and world.sleeps == []
    reps[first].fail = None
    world.now += 4  # still inside its Retry-After
    world.run(core.reweight_job([g], None, {}, False, None))
    assert len(reps[second].reweights()) == 2 and len(reps[first].reweights()) == 0
    world.now += 2  # past it: the key is back on its first choice, which never got the image
    world.run(core.reweight_job([g], None, {}, False, None))
    assert [c.path for c in reps[first].calls[1:]] == ["/v1/images", "/v1/reweight"]


def test_a_hung_replica_is_failed_over_after_the_failover_timeout_and_skipped_for_a_while() -> None:
    core = make_core(URLS)
    reps = {u: Replica(u) for u in URLS}
    world = World(core, list(reps.values()))
    g = groups(1)[0]
    first, second = rank(key_of(g), URLS)[:2]
    reps[first].hung = True
    out = world.run(core.reweight_job([g], None, {}, False, "h1"))
    assert out.results[0].id == "g0" and world.sleeps == []
    # the upload waited the failover timeout on the hung replica, not the full read timeout
    [stuck] = reps[first].calls
    assert stuck.path == "/v1/images"
    assert stuck.timeout.read == pytest.approx(core.timeouts.for_failover(IMAGE_TOKENS_ESTIMATE).read)
    assert stuck.timeout.read < core.timeouts.for_tokens(IMAGE_TOKENS_ESTIMATE).read
    assert world.now == pytest.approx(stuck.timeout.read)
    assert core.stats.replica_timeouts == 1 and core.stats.failovers == 1
    assert [c.path for c in reps[second].calls] == ["/v1/images", "/v1/reweight"]

    # skipped for HUNG_COOLDOWN_S: the next calls cost nothing
    world.now += HUNG_COOLDOWN_S - 1
    world.run(core.reweight_job([g], None, {}, False, "h2"))
    assert len(reps[first].calls) == 1 and len(reps[second].reweights()) == 2

    # after it, one call tries it again; it answers again, so the key is back home
    reps[first].hung = False
    world.now += 2
    world.run(core.reweight_job([g], None, {}, False, "h3"))
    assert [c.path for c in reps[first].calls[1:]] == ["/v1/images", "/v1/reweight"]


def test_without_a_failover_timeout_a_hung_replica_gets_every_retry() -> None:
    core = make_core(URLS, failover_timeout=None)
    reps = {u: Replica(u) for u in URLS}
    world = World(core, list(reps.values()))
    g = groups(1)[0]
    first = rank(key_of(g), URLS)[0]
    reps[first].hung = True
    with pytest.raises(KawhiTimeout):
        world.run(core.reweight_job([g], None, {}, False, None))
    assert len(reps[first].calls) == 5 and core.stats.failovers == 0  # what the issue saw: minutes per call
    assert world.now > 5 * core.timeouts.base


def test_the_last_attempt_and_a_lone_healthy_replica_get_the_full_timeout() -> None:
    core = make_core(URLS)
    reps = [Replica(u) for u in URLS]
    for r in reps:
        r.hung = True
    world = World(core, reps)
    with pytest.raises(KawhiTimeout):
        world.run(core.reweight_job(groups(1), None, {}, False, None))
    reads = [c.timeout.read for r in reps for c in r.calls]
    short = core.timeouts.for_failover(IMAGE_TOKENS_ESTIMATE).read
    full = core.timeouts.for_tokens(IMAGE_TOKENS_ESTIMATE).read
    # two replicas were moved away from; then none healthy is left: the full timeout, with backoff
    assert sorted(reads) == [short, short, full, full, full]
    assert core.stats.replica_timeouts == 2 and core.stats.failovers == 2


def test_with_every_replica_down_the_retry_policy_waits_then_gives_up() -> None:
    core = make_core(URLS)
    reps = [Replica(u) for u in URLS]
    for r in reps:
        r.fail = httpx.ConnectError("refused")
    world = World(core, reps)
    with pytest.raises(KawhiConnectionError) as err:
        world.run(core.reweight_job(groups(1), None, {}, False, None))
    assert err.value.attempts == 5
    assert core.stats.failovers == 2  # the first two failures went on at once, then backoff
    assert len(world.sleeps) == 2
    assert sum(len(r.calls) for r in reps) == 5


def test_a_headless_service_is_resolved_again_and_only_moved_keys_move() -> None:
    core = make_core("dns+http://kawhi-headless.ml.svc:8000", resolve_every=30.0)
    addrs = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
    urls = [f"http://{a}:8000" for a in addrs]
    world = World(core, [Replica(u) for u in urls], dns=addrs[:3])
    batch = groups(30)
    world.run(core.reweight_job(batch, None, {}, False, None))
    assert world.lookups == 1
    before = {g["id"]: rank(key_of(g), urls[:3])[0] for g in batch}
    for rep in world.by_url.values():
        for call in rep.reweights():
            assert {before[x["id"]] for x in json.loads(call.content)["groups"]} == {rep.url}

    # a pod leaves, another joins: seen at the next lookup, 30 s later
    world.dns = [addrs[0], addrs[2], addrs[3]]
    world.run(core.reweight_job(batch, None, {}, False, None))
    assert world.lookups == 1  # not due yet
    world.now += 31
    for rep in world.by_url.values():
        rep.calls.clear()
    world.run(core.reweight_job(batch, None, {}, False, None))
    assert world.lookups == 2
    now = [urls[0], urls[2], urls[3]]
    after = {g["id"]: rank(key_of(g), now)[0] for g in batch}
    assert world.by_url[urls[1]].calls == []
    for rep in world.by_url.values():
        for call in rep.reweights():
            assert {after[x["id"]] for x in json.loads(call.content)["groups"]} == {rep.url}
    for gid in before:  # a key moved only if its replica left or the newcomer outranks it
        assert after[gid] == before[gid] or before[gid] == urls[1] or after[gid] == urls[3]

    # a failed lookup keeps the last set
    world.dns = None
    world.now += 31
    world.run(core.reweight_job(batch, None, {}, False, None))
    assert world.lookups == 3 and core.replicas is not None and len(core.replicas.urls) == 3


def test_readiness_with_replicas_waits_for_any_one() -> None:
    core = make_core(URLS)
    reps = [Replica(u) for u in URLS]
    reps[0].fail = httpx.ConnectError("refused")
    reps[1].fail = (503, {"Retry-After": "1"})
    world = World(core, reps)
    assert world.run(core.wait_ready_job(10)) == {"state": "ready", "reasons": []}
    assert [len(r.calls) for r in reps] == [1, 1, 1]


def test_one_endpoint_sends_the_key_as_a_header_only() -> None:
    client = Client("http://kawhi.test", wait_ready=False)
    client.close()
    core = Core(client.config)
    calls: list[Call] = []

    def run(job: Any) -> Any:
        value: Any = None
        while True:
            done, action = resume(job, value, None)
            if done:
                return action
            if isinstance(action, Parallel):
                value = [run(j) for j in action.jobs]
                continue
            calls.append(action)
            rep = Replica("http://kawhi.test")
            rep.images = {SHAS[0]}
            value = rep.handle(action)

    g = groups(1)[0]
    run(core.reweight_job([g], None, {}, False, None))
    assert [c.path for c in calls] == ["/v1/info", "/v1/images", "/v1/reweight"]
    assert all(c.endpoint is None for c in calls)
    assert calls[1].headers[ROUTING_HEADER] == calls[2].headers[ROUTING_HEADER] == key_of(g)
    assert ROUTING_HEADER not in calls[0].headers
