"""The client against the real service: `kawhi serve` (the embedded kawhi-tiny model) in a
subprocess, over a real socket, with an API key and an image cache small enough
(50 kB) that uploading a third example image evicts the first — so eviction and
re-upload are exercised for real, not scripted.

One server for the module (it takes ~10 s to start on CPU); the fixture waits for it
with the client's own ``wait_ready`` (connection refused, then 503 loading, then ready).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kawhi_client import (
    AsyncClient,
    Client,
    ImageNotFound,
    InvalidRequest,
    Unauthorized,
    pad_token_advantages,
)
from server_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"
KEY = "client-test-key"

pytestmark = pytest.mark.slow


def tiny_png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def group(seed: int, image: Any, n: int = 2, **kw: Any) -> dict[str, Any]:
    return {
        "id": f"g{seed}",
        "image": image,
        "prompt": f"What is drawn? (case {seed})",
        "responses": [{"text": f"A square {seed}.\n\nAnswer: {i}", "reward": float((i + seed) % 2)} for i in range(n)],
        **kw,
    }


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def requests(self, route: str, status: int) -> float:
        return self.metric("kawhi_requests_total", route=route, status=str(status))

    def client(self, **kw: Any) -> Client:
        kw.setdefault("wait_ready", 60.0)
        kw.setdefault("retries", 2)
        return Client(self.url, KEY, **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kawhi.cli", "serve", "--port", str(port), "--api-keys", KEY,
             "--cache-image-bytes", "50000", "--log-level", "warning"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    s = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        with Client(s.url, KEY) as c:
            try:
                ready = c.wait_ready(timeout=120)  # the client's own bounded wait on a starting server
            except Exception:
                raise RuntimeError(f"kawhi serve did not start:\n{log.read_text()[-3000:]}") from None
        assert ready["state"] in ("ready", "degraded")
        yield s
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_round_trip_equals_the_servers_own_answer(server: Server) -> None:
    """The client (image uploaded, then referenced by hash; groups split over two requests)
    gets exactly what one raw POST with the image inlined gets."""
    png = tiny_png(1)
    groups = [group(i, png) for i in range(3)]
    raw = [dict(g, image={"data": base64.b64encode(png).decode()}) for g in groups]
    direct = httpx.post(server.url + "/v1/reweight", json={"groups": raw, "options": {"seed": 5}},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert direct.status_code == 200, direct.text
    want = direct.json()
    # per_group_errors=True gives a different idempotency key: the server computes again
    with server.client(max_groups_per_request=2) as c:
        got = c.reweight_response(groups, seed=5, per_group_errors=True)
    assert got.model_dump(mode="json")["results"] == want["results"]
    assert got.model == want["model"] and got.options == want["options"]


def test_an_image_is_uploaded_once_then_referenced_by_hash(server: Server) -> None:
    png = tiny_png(2)
    sha = hashlib.sha256(png).hexdigest()
    before = server.requests("/v1/images", 200)
    with server.client() as c:
        c.reweight([group(i, png) for i in range(4)])
        c.reweight([group(i + 10, png) for i in range(2)])
        assert c.stats.images_uploaded == 1 and c.stats.image_bytes_uploaded == len(png)
    assert server.requests("/v1/images", 200) - before == 1
    # the server holds those exact bytes: a group may now name the hash alone
    with server.client() as c:
        res = c.reweight([group(0, {"sha256": sha})])
        assert res[0].error is None and c.stats.images_uploaded == 0


def test_files_are_sent_unchanged_by_path(server: Server) -> None:
    path = IMAGES / "bar_chart.png"
    with server.client() as c:
        sha = c.upload_image(path)  # the server answers the hash of what it received
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_evicted_image_is_uploaded_again(server: Server) -> None:
    """The server's image cache holds 50 kB: three ~20 kB images evict the first."""
    a, b, c_ = (IMAGES / n for n in ("bar_chart.png", "line_plot.png", "triangle.png"))
    with server.client() as c:
        for p in (a, b, c_):
            c.upload_image(p)
        res = c.reweight([group(0, a)])  # the client believes the server holds `a`: it sends the hash
        assert res[0].error is None
        assert c.stats.image_reuploads == 1
        # the same with per-group errors: only the evicted group is redone
        for p in (b, c_):
            c.upload_image(p)
        res = c.reweight([group(1, tiny_png(3)), group(2, a)], per_group_errors=True)
        assert [r.error for r in res] == [None, None]
        assert c.stats.image_reuploads == 2


def test_a_big_batch_is_split_and_comes_back_in_order(server: Server) -> None:
    png = tiny_png(4)
    groups = [group(i, png, n=2 + i % 3) for i in range(7)]
    before = server.requests("/v1/reweight", 200)
    with server.client(max_groups_per_request=2, max_in_flight=3) as c:
        res = c.reweight(groups, request_id="batch-1", seed=1)
        assert c.stats.reweight_requests == 4
    assert server.requests("/v1/reweight", 200) - before == 4
    assert [r.id for r in res] == [g["id"] for g in groups]
    assert [len(r.responses) for r in res] == [len(g["responses"]) for g in groups]
    # each group's result is what it gets on its own
    with server.client() as c:
        alone = c.reweight([groups[5]], seed=1, per_group_errors=True)[0]
    np.testing.assert_allclose(
        [x for r in res[5].responses for x in r.token_advantages],
        [x for r in alone.responses for x in r.token_advantages], rtol=1e-5, atol=1e-6)


def test_client_errors_are_never_retried_and_point_into_the_callers_list(server: Server) -> None:
    png = tiny_png(5)
    before = server.requests("/v1/reweight", 422)
    with server.client(max_groups_per_request=1, retries=5) as c:
        c.upload_image(png)
        c.info()
        sent = c.stats.http_requests
        bad = group(2, png, advantages=[1.0])  # 1 advantage for 2 responses
        with pytest.raises(InvalidRequest) as info:
            c.reweight([group(0, png), group(1, png), bad], request_id="step-9")
        assert c.stats.http_requests - sent == 3  # three requests, one attempt each
        assert c.stats.retries == 0
    err = info.value
    assert err.status == 422 and err.pointer == "/groups/2/advantages"  # the server said /groups/0/...
    assert err.request_id == "step-9.2" and err.attempts == 1
    assert server.requests("/v1/reweight", 422) - before == 1


def test_per_group_errors_surface_in_the_group_result(server: Server) -> None:
    png = tiny_png(6)
    with server.client(max_groups_per_request=1) as c:
        res = c.reweight([group(0, png), group(1, png, advantages=[1.0]), {"id": "x", "image": png}],
                         per_group_errors=True)
    assert res[0].error is None and res[0].responses
    assert res[1].error is not None and res[1].error.pointer == "/groups/1/advantages" and res[1].id == "g1"
    assert res[2].error is not None and res[2].error.pointer.startswith("/groups/2")  # refused by the client


def test_an_unknown_hash_is_a_typed_404(server: Server) -> None:
    with server.client() as c:
        with pytest.raises(ImageNotFound) as info:
            c.reweight([group(0, {"sha256": "0" * 64})])
    assert info.value.sha256 == "0" * 64 and info.value.pointer == "/groups/0/image/sha256"
    assert info.value.attempts == 1


def test_the_api_key_is_sent_and_a_wrong_one_is_refused(server: Server) -> None:
    before = server.requests("/v1/info", 401)
    with Client(server.url, "wrong", wait_ready=30, retries=5) as c:
        with pytest.raises(Unauthorized) as info:
            c.reweight([group(0, tiny_png(7))])
        assert c.stats.http_requests == 1 and info.value.status == 401
    with Client(server.url, api_key="", wait_ready=30) as c:  # no key at all
        with pytest.raises(Unauthorized):
            c.info()
    assert server.requests("/v1/info", 401) - before == 2
    with server.client() as c:
        assert c.info()["limits"]["max_groups"] > 0
        assert c.limits is not None and c.limits.max_groups == c.info()["limits"]["max_groups"]


def test_the_async_client_gets_the_same_answer(server: Server) -> None:
    png = tiny_png(8)
    groups = [group(i, png) for i in range(3)]

    async def run() -> list[Any]:
        async with AsyncClient(server.url, KEY, wait_ready=60, max_groups_per_request=1) as c:
            a, b = await asyncio.gather(c.reweight(groups, seed=2), c.reweight(groups[::-1], seed=2))
            assert c.stats.images_uploaded >= 1
            return [a, b]

    a, b = asyncio.run(run())
    with server.client() as c:
        sync = c.reweight(groups, seed=2)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in sync]
    assert [r.id for r in b] == ["g2", "g1", "g0"]


def test_token_advantages_line_up_with_the_trainers_mask(server: Server) -> None:
    """The trainer sends its own token ids; the service returns one advantage per id;
    the padding helper places them under the trainer's response mask."""
    png = tiny_png(9)
    ids = [[11, 12, 13, 14], [21, 22], [31, 32, 33]]
    g = group(0, png, n=3)
    for r, t in zip(g["responses"], ids):
        r["token_ids"] = t
    with server.client() as c:
        res = c.reweight([g])
    width = 6
    mask = np.zeros((3, width), dtype=np.int64)
    for i, t in enumerate(ids):
        mask[i, width - len(t):] = 1  # right-aligned responses in a padded batch
    adv = pad_token_advantages(res, response_mask=mask)
    assert adv.shape == (3, width) and adv.dtype == np.float32
    for i, r in enumerate(res[0].responses):
        assert len(r.token_advantages) == len(ids[i])
        np.testing.assert_allclose(adv[i][mask[i] == 1], r.token_advantages, rtol=1e-6)
        assert not adv[i][mask[i] == 0].any()
