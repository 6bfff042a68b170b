"""The server over a real redis-server: shared caches, Redis killed mid-run, recovery."""

from __future__ import annotations

import json
import threading
import time

import httpx
from server_fixtures import (
    RedisServer,
    ServerThread,
    assert_problem,
    metric,
    png_bytes,
    redis_server,  # noqa: F401  (fixture)
    small_group,
)


def _readyz(c: httpx.Client) -> dict:
    r = c.get("/readyz")
    assert r.status_code == 200, r.text  # degraded is still ready: the service answers
    return r.json()


def _wait_state(c: httpx.Client, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = _readyz(c)
        if body["state"] == state:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_idempotent_retry_is_served_from_redis_across_replicas(redis_server: RedisServer) -> None:
    body = {"groups": [small_group(400), small_group(401)]}
    with ServerThread(redis_url=redis_server.url) as a, a.client() as c:
        assert _readyz(c)["state"] == "ready"
        first = c.post("/v1/reweight", json=body)
        assert first.status_code == 200 and first.headers["x-kawhi-cache"] == "miss"
        upload = c.post("/v1/images", content=png_bytes(50, 50, seed=99), headers={"content-type": "image/png"})
        sha = upload.json()["sha256"]
    # a second replica with an empty memory: the stored answer and the image come from Redis
    with ServerThread(redis_url=redis_server.url) as b, b.client() as c:
        retry = c.post("/v1/reweight", json=body)
        assert retry.status_code == 200 and retry.headers["x-kawhi-cache"] == "hit"
        assert retry.content == first.content
        g = small_group(402)
        g["image"] = {"sha256": sha}
        assert c.post("/v1/reweight", json={"groups": [g]}).status_code == 200
        m = c.get("/metrics").text
        assert metric(m, "kawhi_groups_total") == 1  # only the new group ran a forward
        assert metric(m, "kawhi_cache_hits_total", 'kind="result"') >= 1
        assert metric(m, "kawhi_cache_hits_total", 'kind="image"') >= 1
        assert metric(m, "kawhi_redis_degraded") == 0


def test_redis_killed_mid_run_keeps_answering_then_recovers(redis_server: RedisServer) -> None:
    with ServerThread(redis_url=redis_server.url, redis_retry_s=0.2, redis_timeout_s=0.3) as s, s.client() as c:
        data = png_bytes(52, 52, seed=5)
        sha = c.post("/v1/images", content=data, headers={"content-type": "image/png"}).json()["sha256"]
        assert _readyz(c)["state"] == "ready"

        # load from several clients while Redis dies under it
        statuses: list[int] = []
        stop = threading.Event()
        lock = threading.Lock()

        def worker(k: int) -> None:
            i = 0
            with s.client() as wc:
                while not stop.is_set():
                    r = wc.post("/v1/reweight", json={"groups": [small_group(1000 * (k + 1) + i)]})
                    with lock:
                        statuses.append(r.status_code)
                    i += 1

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        redis_server.kill()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        assert statuses and all(code == 200 for code in statuses), statuses

        # still answering, from memory: the image uploaded before the crash is held in the LRU
        g = small_group(500)
        g["image"] = {"sha256": sha}
        assert c.post("/v1/reweight", json={"groups": [g]}).status_code == 200
        ready = _wait_state(c, "degraded")
        assert any("redis" in reason for reason in ready["reasons"]), ready
        assert str(redis_server.port) not in json.dumps(ready), ready  # no internal host:port in a public probe
        m = c.get("/metrics").text
        assert metric(m, "kawhi_redis_degraded") == 1
        assert metric(m, "kawhi_redis_errors_total") >= 1
        # idempotent retries still work from memory
        body = {"groups": [small_group(501)]}
        assert c.post("/v1/reweight", json=body).headers["x-kawhi-cache"] == "miss"
        assert c.post("/v1/reweight", json=body).headers["x-kawhi-cache"] == "hit"
        # an unknown hash is still a clean 404, not a Redis error
        g = small_group(502)
        g["image"] = {"sha256": "ef" * 32}
        assert_problem(c.post("/v1/reweight", json={"groups": [g]}), 404, "/groups/0/image/sha256")

        # Redis comes back: the probe notices, /readyz and the gauge recover
        redis_server.start()
        _wait_state(c, "ready")
        assert metric(c.get("/metrics").text, "kawhi_redis_degraded") == 0
        body = {"groups": [small_group(503)]}
        assert c.post("/v1/reweight", json=body).status_code == 200
        import redis

        keys = redis.Redis.from_url(redis_server.url).keys("kawhi:v1:result:*")
        assert keys, "answers are written to Redis again after recovery"


def test_redis_unreachable_at_start_serves_degraded() -> None:
    from server_fixtures import free_port

    with ServerThread(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.2) as s, s.client() as c:
        ready = _readyz(c)
        assert ready["state"] == "degraded" and ready["reasons"]
        assert c.post("/v1/reweight", json={"groups": [small_group(600)]}).status_code == 200
        assert c.get("/v1/info").json()["server"]["redis_degraded"] is True
