#!/usr/bin/env python3
"""Closed-loop load test of `kawhi serve`: requests/s and latency percentiles.

By default it starts its own server (the embedded kawhi-tiny model, on a free port, no
auth, no Redis) and stops it at the end; ``--url`` targets a running one instead.
Every request is distinct (its group ids carry a counter), so no answer comes from
the idempotency cache; the images are the repository's examples, inline base64.

    python scripts/load_test.py                          # 8 clients, 20 s, 1 group/request
    python scripts/load_test.py --concurrency 32 --duration 30 --groups 4
    python scripts/load_test.py --url http://10.0.0.5:8000 --api-key "$KEY"

Prints one JSON object: requests, errors by status, requests/s, groups/s,
tokens/s and latency p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def example_groups() -> list[dict[str, Any]]:
    groups = []
    for line in (ROOT / "examples" / "rollouts.jsonl").read_text().splitlines():
        if line.strip():
            g = json.loads(line)
            g["image"] = {"data": base64.b64encode((ROOT / "examples" / g["image"]["path"]).read_bytes()).decode()}
            groups.append(g)
    return groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "service"), str(ROOT / "client"), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "kawhi.server.main", "--port", str(port), "--log-level", "warning", *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    templates = example_groups()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    counter = 0
    run_id = os.urandom(4).hex()
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    groups_done = 0
    tokens_done = 0

    def body() -> dict[str, Any]:
        nonlocal counter
        groups = []
        for _ in range(args.groups):
            g = dict(templates[counter % len(templates)])
            g["id"] = f"load-{run_id}-{counter}"  # distinct across runs too: no idempotent replays
            counter += 1
            groups.append(g)
        return {"groups": groups}

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=args.concurrency)) as client:
        for _ in range(args.warmup):  # first forwards pay one-off costs
            await client.post("/v1/reweight", json=body())
        stop_at = time.perf_counter() + args.duration

        async def worker() -> None:
            nonlocal groups_done, tokens_done
            while time.perf_counter() < stop_at:
                payload = body()
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/reweight", json=payload)
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    r = None
                dt = time.perf_counter() - t0
                statuses[status] = statuses.get(status, 0) + 1
                if r is not None and r.status_code == 200:
                    latencies.append(dt)
                    groups_done += len(payload["groups"])
                    tokens_done += r.json()["usage"]["tokens"]
                elif r is not None and r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t_start

    ms = [x * 1000 for x in latencies]
    return {
        "url": url,
        "concurrency": args.concurrency,
        "groups_per_request": args.groups,
        "duration_s": round(wall, 2),
        "requests_ok": len(latencies),
        "statuses": statuses,
        "groups_ok": groups_done,
        "requests_per_s": round(len(latencies) / wall, 2),
        "groups_per_s": round(groups_done / wall, 2),
        "tokens_per_s": round(tokens_done / wall, 1),
        "latency_ms": {
            "p50": round(percentile(ms, 0.50), 1),
            "p90": round(percentile(ms, 0.90), 1),
            "p99": round(percentile(ms, 0.99), 1),
            "max": round(max(ms), 1) if ms else None,
            "mean": round(statistics.fmean(ms), 1) if ms else None,
        },
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one with the embedded kawhi-tiny model)")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, default=8, help="clients, each with one request in flight")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measurement")
    p.add_argument("--groups", type=int, default=1, help="rollout groups per request (5 responses each)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("server_args", nargs="*", help="extra `kawhi serve` flags for the server this script starts "
                   "(after --)")
    args = p.parse_args(argv)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port, args.server_args)
    try:
        wait_ready(url)
        print(json.dumps(asyncio.run(run(url.rstrip("/"), args)), indent=2))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
