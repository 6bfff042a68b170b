"""`kawhi serve` as a subprocess on 127.0.0.1, and the HTTP clients the benchmarks use.

Everything here talks to the loopback interface only: :class:`Server` binds 127.0.0.1 on a
free port, and the clients refuse any other host. Every loop is bounded (a request
count or a deadline), so a benchmark always stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.measure import REPO

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in (LOOPBACK, "localhost", "::1"):
        raise ValueError(f"benchmarks only talk to the loopback interface, not {host!r}")


class Server:
    """``kawhi serve`` in a subprocess (``with Server(...) as srv: srv.url``).

    model_dir: a model folder (``bench.models.save_reference``) or None for the demo model.
    flags: extra ``kawhi serve`` flags, e.g. ``{"batch_wait_ms": 5, "queue_groups": 64}``.
    grpc: also serve gRPC, on a port of its own (``srv.grpc_target``).
    """

    def __init__(self, model_dir: Path | None = None, *, flags: dict[str, Any] | None = None,
                 threads: int | None = None, ready_timeout: float = 180.0, grpc: bool = False) -> None:
        self.model_dir = model_dir
        self.flags = dict(flags or {})
        self.grpc_target: str | None = None
        if grpc:
            self.flags["grpc_port"] = free_port()
            self.grpc_target = f"{LOOPBACK}:{self.flags['grpc_port']}"
        self.threads = threads
        self.ready_timeout = ready_timeout
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="kawhi-bench-serve-", suffix=".log", delete=False)
        self.startup_s: float | None = None
        self.info: dict[str, Any] = {}

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "kawhi.cli", "serve", "--host", LOOPBACK, "--port", str(self.port),
               "--log-level", "warning"]
        if self.model_dir is not None:
            cmd += ["--model", str(self.model_dir)]
        for name, value in self.flags.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        return cmd

    def __enter__(self) -> Server:
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("KAWHI_")}  # only our flags count
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kawhi serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise TimeoutError(f"kawhi serve not ready after {self.ready_timeout} s:\n{self.log_tail()}")
                time.sleep(0.1)
            self.startup_s = time.perf_counter() - t0
            self.info = client.get(self.url + "/v1/info").json()
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains, then exits 0
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


def metrics_snapshot(url: str) -> dict[str, float]:
    """Server-side counters from /metrics: forward and prepare seconds, batches, groups, process CPU."""
    import httpx

    _check_loopback(url)
    wanted = ("kawhi_forward_seconds_sum", "kawhi_forward_seconds_count", "kawhi_prepare_seconds_sum",
              "kawhi_prepare_seconds_count", "kawhi_batch_groups_sum", "kawhi_batch_groups_count",
              "process_cpu_seconds_total", "kawhi_prefix_cache_hits_total", "kawhi_prefix_cache_misses_total",
              "kawhi_prefix_cache_coalesced_total")
    out: dict[str, float] = {}
    text = httpx.get(url + "/metrics", timeout=10.0).text
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "forward_s": d.get("kawhi_forward_seconds_sum", 0.0),
        "forwards": d.get("kawhi_forward_seconds_count", 0.0),
        "prepare_s": d.get("kawhi_prepare_seconds_sum", 0.0),
        "groups": d.get("kawhi_batch_groups_sum", 0.0),
        "server_cpu_s": d.get("process_cpu_seconds_total", 0.0),
        "prefix_hits": d.get("kawhi_prefix_cache_hits_total", 0.0),
        "prefix_misses": d.get("kawhi_prefix_cache_misses_total", 0.0),
        "prefix_coalesced": d.get("kawhi_prefix_cache_coalesced_total", 0.0),
    }


# ---------------------------------------------------------------------- clients
def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_s": None, "p95_s": None, "p99_s": None, "mean_s": None, "max_s": None}
    ordered = sorted(values)

    def pct(p: float) -> float:  # nearest-rank
        k = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))
        return ordered[k]

    return {"p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99), "mean_s": statistics.fmean(ordered),
            "max_s": ordered[-1]}


def _check_body(content: bytes) -> int:
    """Group-level errors in a 200 answer (each result's ``error``)."""
    data = json.loads(content)
    return sum(1 for r in data.get("results", []) if r.get("error"))


async def _post_all(url: str, bodies: list[bytes], concurrency: int, timeout: float) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    group_errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            nonlocal group_errors
            while True:
                try:
                    body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                r = await client.post(url + "/v1/reweight", content=body,
                                      headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - t0)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    group_errors += _check_body(r.content)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": len(bodies), "statuses": statuses, "group_errors": group_errors,
            "latency": _percentiles(latencies)}


def post_all(url: str, bodies: list[bytes], concurrency: int = 2, timeout: float = 600.0) -> dict[str, Any]:
    """POST every body to /v1/reweight with ``concurrency`` in flight; wall time and statuses."""
    _check_loopback(url)
    return asyncio.run(_post_all(url, bodies, concurrency, timeout))


async def _load(url: str, make_body: Callable[[int, int], tuple[bytes, int, int]], clients: int, duration: float,
                timeout: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    failures: dict[str, int] = {}
    ok_groups = ok_tokens = group_errors = 0
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one_client(cid: int) -> None:
            nonlocal ok_groups, ok_tokens, group_errors
            seq = 0
            while time.monotonic() < deadline:
                body, groups, tokens = make_body(cid, seq)
                seq += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/v1/reweight", content=body,
                                          headers={"content-type": "application/json"})
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                dt = time.perf_counter() - t0
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
                if r.status_code == 200:
                    latencies.append(dt)
                    ok_groups += groups
                    ok_tokens += tokens
                    group_errors += _check_body(r.content)
                elif r.status_code == 429:  # back off as told, never past the deadline
                    retry = float(r.headers.get("retry-after", "1") or 1)
                    await asyncio.sleep(max(0.0, min(retry, deadline - time.monotonic())))

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    errors = sum(n for s, n in statuses.items() if s not in ("200", "429")) + sum(failures.values()) + group_errors
    return {
        "clients": clients,
        "duration_s": duration,
        "wall_s": wall,
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "transport_failures": failures,
        "group_errors": group_errors,
        "errors_other_than_429": errors,
        "ok_requests_per_s": statuses.get("200", 0) / wall,
        "groups_per_s": ok_groups / wall,
        "sequence_tokens_per_s": ok_tokens / wall,
        "latency": _percentiles(latencies),
    }


def load(url: str, make_body: Callable[[int, int], tuple[bytes, int, int]], *, clients: int = 8,
         duration: float = 20.0, timeout: float = 120.0) -> dict[str, Any]:
    """``clients`` concurrent closed-loop clients for ``duration`` seconds (then they stop).

    make_body(client, seq) -> (body, groups in it, sequence tokens in it); bodies must be
    unique or the server's idempotent cache answers. Latency percentiles are over the 200s;
    a 429 makes that client wait Retry-After (capped by the deadline).
    """
    _check_loopback(url)
    return asyncio.run(_load(url, make_body, clients, duration, timeout))
