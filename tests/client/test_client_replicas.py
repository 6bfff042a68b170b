"""Three real `kawhi serve` replicas (demo model, loopback ports) and a workload of groups
sent one sample per request: every group's requests land on one replica, the work spreads
over the replicas, the affinity ratio equals one replica's, and SIGKILLing a replica mid-run
loses no request. What each replica saw is read from its own /metrics
(``kawhi_routing_requests_total``, the image uploads, ``kawhi_prefix_cache_misses_total``:
each group's prefix is computed once in all, as on one replica); the harness is
bench/replicas.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "service", ROOT / "client"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from kawhi_client import AsyncClient  # noqa: E402
from kawhi_client.replicas import rank  # noqa: E402
from kawhi_client.routing import ROUTING_HEADER  # noqa: E402

from bench.replicas import key_of, replicas, run, scrape, workload  # noqa: E402

pytestmark = pytest.mark.slow

GROUPS, SAMPLES = 12, 3


@pytest.fixture(scope="module")
def three():
    with replicas(3) as servers:
        yield servers


def test_each_group_stays_on_one_replica_and_the_work_spreads(three) -> None:
    work = workload(GROUPS, SAMPLES, tag="spread-")
    out = run(three, work, in_flight=4)
    assert out["lost"] == 0 and out["answered"] == GROUPS * SAMPLES, out["errors"]
    # every group was new on exactly one replica: none of its requests reached another
    assert out["group_starts"] == GROUPS
    assert out["affinity_ratio"] == out["best_affinity_ratio"] == round(1 - 1 / SAMPLES, 4)
    # ... and on the one rendezvous hashing picks for its key
    urls = [s.url for s in three]
    expected = {u: 0 for u in urls}
    for key in {key_of(r) for r in work}:
        expected[rank(key, urls)[0]] += 1
    assert out["groups_per_replica"] == expected
    assert sum(1 for n in expected.values() if n) >= 2  # 12 keys on one replica of 3: p = 3^-11
    assert out["uploads"] == GROUPS  # each group's image went to its replica only, once
    assert out["client"]["failovers"] == 0
    # the prefix cache: each group's image + prompt computed once, in all (as on one replica)
    assert out["prefixes_computed"] == GROUPS


def test_killing_a_replica_mid_run_loses_no_request(three) -> None:
    work = workload(GROUPS, SAMPLES, tag="kill-")
    out = run(three, work, in_flight=4, kill_after=1 / 3)
    assert out["lost"] == 0 and out["answered"] == GROUPS * SAMPLES, out["errors"]
    assert out["replicas"] == 3 and len(out["groups_per_replica"]) == 2  # one is gone
    if out["killed_groups"]:
        assert out["client"]["failovers"] >= 1
        assert out["in_flight_at_kill"] == 0 or out["recovery_s"] > 0
    # every group, moved or not, is new on exactly one of the survivors, and its prefix computed there once
    assert out["group_starts"] == GROUPS
    assert out["prefixes_computed"] == GROUPS


def test_the_routing_key_reaches_the_server_on_every_request(three) -> None:
    live = next(s for s in three if s.proc is not None and s.proc.poll() is None)
    before = scrape(live.url)
    request = workload(1, 1, tag="header-")[0]
    r = httpx.post(live.url + "/v1/reweight", json={"groups": [{**request, "image": {"sha256": "0" * 64}}]},
                   headers={ROUTING_HEADER: "not a key"}, timeout=30)
    assert r.status_code == 404  # an unknown image; a malformed key is ignored, never refused
    after = scrape(live.url)
    assert after["routing_none"] - before["routing_none"] == 1
    assert after["routing_new"] == before["routing_new"]


async def _async_round_trip(url: str) -> list[str]:
    host, port = url.removeprefix("http://").split(":")
    async with AsyncClient(replicas=f"dns+http://{host}:{port}", wait_ready=5) as client:
        work = workload(2, 2, tag="dns-")
        results = [(await client.reweight([r]))[0] for r in work]
        assert client.replicas == (url,)
        return [r.id for r in results]


def test_a_dns_name_of_replicas_with_the_async_client(three) -> None:
    import asyncio

    live = next(s for s in three if s.proc is not None and s.proc.poll() is None)
    before = scrape(live.url)
    ids = asyncio.run(_async_round_trip(live.url))
    assert ids == [r["id"] for r in workload(2, 2, tag="dns-")]
    after = scrape(live.url)
    assert after["routing_new"] - before["routing_new"] == 2 and after["routing_seen"] - before["routing_seen"] == 2
