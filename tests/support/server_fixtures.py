"""Fixtures for the server tests: a real uvicorn in a thread, a real redis-server, real HTTP.

Imported by module name (tests/conftest.py puts tests/support on sys.path); the shared
fixtures built on it (default_server, unused_port) are in tests/conftest.py.
Nothing here fakes the engine: servers run the embedded kawhi-tiny model, loaded once per
test session and shared by every in-thread server (each server still has its own
app, batcher, caches and metrics).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

REDIS_BIN = shutil.which("redis-server")


# ---------------------------------------------------------------------- ports, images, groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(width: int = 56, height: int = 56, seed: int = 0) -> bytes:
    """A small deterministic PNG with some structure (a bright square on a gradient)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (20 + seed % 200, 40, 60))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 250, 250))
    draw.line([0, height - 1, width - 1, 0], fill=(0, 0, 0), width=3)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression-bomb shape); the data is tiny."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def example_groups() -> list[dict[str, Any]]:
    """The repository's example rollout groups with their images inlined as base64."""
    groups = []
    for line in (EXAMPLES / "rollouts.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        g = json.loads(line)
        g["image"] = {"data": b64((EXAMPLES / g["image"]["path"]).read_bytes())}
        groups.append(g)
    return groups


def small_group(seed: int = 0, n: int = 3, image: bytes | None = None) -> dict[str, Any]:
    """A cheap group: a 56x56 image and short two-paragraph responses, distinct per seed."""
    return {
        "id": f"g{seed}",
        "image": {"data": b64(image if image is not None else png_bytes(56, 56, seed))},
        "prompt": f"What is drawn? (case {seed})",
        "responses": [
            {"text": f"A square {seed} and a line.\n\nAnswer: {i}", "reward": float((i + seed) % 2)}
            for i in range(n)
        ],
    }


# ---------------------------------------------------------------------- redis


class RedisServer:
    """A throwaway redis-server (no persistence) that tests may kill and restart."""

    def __init__(self) -> None:
        if REDIS_BIN is None:
            pytest.skip(
                "!!! redis-server binary NOT FOUND: the Redis tests of the server are SKIPPED. "
                "Install it (apt-get install redis-server, or bash scripts/setup.sh) !!!"
            )
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kawhi-test-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------- the engine


_MODEL: Any = None
_MODEL_LOCK = threading.Lock()


def default_engine(settings: Any = None) -> Any:
    """A real kawhi-tiny Engine (the default model) configured exactly as `kawhi serve` with no
    --model would build it from ``settings``; the test policies (tiny_models) share its tokenizer.

    The weights are loaded once per session; each call wraps them in a new Engine
    with the settings' method defaults and limits (the same as app.load_engine).
    """
    global _MODEL
    from kawhi.engine.engine import Engine
    from kawhi.pipeline.limits import engine_limits, load_engine
    from kawhi.settings import Settings

    settings = settings if settings is not None else Settings()
    with _MODEL_LOCK:
        if _MODEL is None:
            from kawhi.engine.engine import TINY_MODEL_DIR

            _MODEL = load_engine(Settings(model=str(TINY_MODEL_DIR)))
    base = _MODEL
    return Engine(base.model, settings.method_config(), limits=engine_limits(settings), is_demo=base.is_demo,
                  model_name=base.model_name, model_card=base.model_card)


# ---------------------------------------------------------------------- in-thread server


class ServerThread:
    """create_app(settings, engine) under a real uvicorn on a free port, in a thread."""

    def __init__(self, engine: Any = "default", **overrides: Any) -> None:
        """engine: "default" (the shared kawhi-tiny engine), an Engine, or None (the app loads
        the one its settings name, as `kawhi serve` does)."""
        import uvicorn
        from kawhi.server.app import create_app
        from kawhi.settings import Settings

        overrides.setdefault("log_level", "warning")
        self.settings = Settings(**overrides)
        self.app = create_app(self.settings, engine=default_engine(self.settings) if engine == "default" else engine)
        self.state = self.app.state.kawhi
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, **kw)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_ready(self.url, timeout)


def wait_ready(url: str, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url + "/readyz", timeout=2)
            if last.status_code == 200:
                return last
        except httpx.TransportError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s: {last!r}")


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in a Prometheus exposition (0.0 when absent)."""
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    return 0.0


def assert_problem(resp: httpx.Response, status: int, pointer: str | None) -> dict[str, Any]:
    """resp is an RFC 9457 problem with this status and (when given) this pointer."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body = resp.json()
    for key in ("type", "title", "status", "detail", "pointer"):
        assert key in body, body
    assert body["status"] == status
    if pointer is not None:
        assert body["pointer"] == pointer, body
    return body


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env
