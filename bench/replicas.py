"""Group affinity across replicas, on loopback: N ``kawhi serve`` replicas (demo model), a
workload of groups sent one sample per request (as verl sends them), and what each
replica saw.

    python -m bench.replicas                              # the table in bench/README.md
    python -m bench.replicas --groups 24 --samples 8 --in-flight 6 --out results.json

Four runs over the same workload shape (fresh prompts each run, so no run inherits another's
state): one replica; three replicas through ``Client(replicas=[...])`` (rendezvous hashing on
the routing key); three replicas with each request sent to a random one (what a plain
Kubernetes Service does: kube-proxy picks a backend at random per connection); three
replicas with affinity and one replica SIGKILLed after a third of the requests. For each: requests answered, throughput, the affinity ratio
``seen / (seen + new)`` of the routing keys the replicas counted
(``kawhi_routing_requests_total``; the best possible is ``1 - groups / requests``, what one
replica sees), how many replicas a group touched, image uploads, and the prefix-cache hit
ratio when the server exports it. The failover run adds the client's failovers and retries,
how many of the dead replica's requests were in flight at the kill and how long until the
last of them was answered elsewhere (``recovery_s``), and the median latency of its groups'
later requests on their new replicas.

The numbers are for throughput *shape*, not capacity: on a small shared CPU machine three
replicas share the same cores, so they cannot multiply throughput there; on one GPU per
replica they would.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import random
import re
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from kawhi_client import Client
from kawhi_client.replicas import rank
from kawhi_client.routing import routing_key

from bench.server import Server, _check_loopback
from bench.workload import image_png

SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$')


def workload(groups: int, samples: int, *, tag: str = "", side: int = 112) -> list[dict[str, Any]]:
    """``groups`` groups of ``samples`` responses, one request per response, sample-major
    (every group's first sample, then every group's second ...), as a trainer interleaves
    them. Each request is a one-response group; its ``id`` is ``<group>.<sample>``."""
    out = []
    for s in range(samples):
        for g in range(groups):
            out.append({"id": f"{tag}g{g}.s{s}", "image": image_png((side, side), seed=g),
                        "prompt": f"{tag}Question {g}: which bar is the tallest?",
                        "responses": [{"text": f"Answer {s}: the bar in the middle, number {s % 5}.",
                                       "reward": float(s % 2)}]})
    return out


def key_of(request: dict[str, Any]) -> str:
    return routing_key(hashlib.sha256(request["image"]).hexdigest(), request["prompt"])


def scrape(url: str) -> dict[str, float]:
    """The counters of one replica this benchmark reads, from its /metrics."""
    _check_loopback(url)
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10.0).text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "kawhi_routing_requests_total":
            out["routing_" + labels.split('"')[1]] = value
        elif name in ("kawhi_cache_hits_total", "kawhi_cache_misses_total") and 'kind="image"' in labels:
            out[name.replace("kawhi_cache_", "image_").replace("_total", "")] = value
        elif name in ("kawhi_prefix_cache_hits_total", "kawhi_prefix_cache_misses_total",
                      "kawhi_prefix_cache_coalesced_total"):
            out[name.replace("kawhi_", "").replace("_total", "")] = value
        elif name == "kawhi_requests_total" and 'route="/v1/images"' in labels:
            out["uploads"] = out.get("uploads", 0.0) + value
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


@contextlib.contextmanager
def replicas(n: int, *, threads: int = 1, model_dir: Path | None = None,
             flags: dict[str, Any] | None = None, grpc: bool = False) -> Iterator[list[Server]]:
    """``n`` replicas on loopback ports (demo model, or ``model_dir``; extra ``kawhi serve``
    ``flags``; ``grpc``: each with a gRPC listener too, ``server.grpc_target``), started
    together, stopped on exit."""
    servers = [Server(model_dir, flags=flags, threads=threads, grpc=grpc) for _ in range(n)]
    with contextlib.ExitStack() as stack:
        for s in servers:
            stack.push(s.__exit__)  # a replica that did start is stopped even if another did not
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(s.__enter__) for s in servers]
        for f in futures:
            f.result()
        yield servers


def run(servers: list[Server], work: list[dict[str, Any]], *, mode: str = "affinity", in_flight: int = 4,
        kill_after: float | None = None, front: str | None = None) -> dict[str, Any]:
    """Send every request of ``work`` (``in_flight`` at a time) and report what happened.

    mode: ``affinity`` (one Client over all replicas), ``random`` (each request to a
    replica drawn by a seeded RNG, one plain Client per replica), ``front`` (one plain
    Client of the proxy at ``front``, e.g. an NGINX hashing on the routing key header). ``kill_after``: SIGKILL the replica owning
    the most groups once that fraction of the requests has been answered.
    """
    urls = [s.url for s in servers]
    alive = [s for s in servers if s.proc is not None and s.proc.poll() is None]
    before = {s.url: scrape(s.url) for s in alive}
    owners = {key_of(r): rank(key_of(r), urls)[0] if mode == "affinity" else None for r in work}
    victim: Server | None = None
    if kill_after is not None:  # the replica owning the most groups (behind a proxy: the first)
        most = Counter(owners.values()).most_common(1)[0][0] or urls[0]
        victim = next(s for s in servers if s.url == most)
    if mode == "affinity":
        clients = [Client(replicas=urls, max_in_flight=in_flight, timeout=120)]
    elif mode == "front":
        assert front is not None
        _check_loopback(front)
        clients = [Client(front, max_in_flight=in_flight, timeout=120)]
    else:
        clients = [Client(u, max_in_flight=in_flight, timeout=120) for u in urls]
    draw = random.Random(0)
    pick = [draw.randrange(len(urls)) for _ in work]
    lock = threading.Lock()
    done = 0
    killed_at: float | None = None
    records: list[dict[str, Any]] = []

    def one(i: int, request: dict[str, Any]) -> None:
        nonlocal done, killed_at
        client = clients[pick[i]] if mode == "random" else clients[0]
        t0 = time.perf_counter()
        result = client.reweight([request])[0]
        t1 = time.perf_counter()
        ok = result.id == request["id"] and result.error is None
        with lock:
            records.append({"t0": t0, "t1": t1, "ok": ok, "owner": owners[key_of(request)]})
            done += 1
            if victim is not None and killed_at is None and done >= kill_after * len(work):  # type: ignore[operator]
                assert victim.proc is not None
                victim.proc.kill()  # SIGKILL: no drain, connections reset
                killed_at = time.perf_counter()

    start = time.perf_counter()
    errors: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        futures = [pool.submit(one, i, r) for i, r in enumerate(work)]
        for f in futures:
            try:
                f.result()
            except Exception as exc:  # a lost request: counted, named
                errors.append(f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - start
    stats = [c.stats.snapshot() for c in clients]
    for c in clients:
        c.close()

    per_replica = {}
    for s in servers:
        if s.url in before and s.proc is not None and s.proc.poll() is None:
            per_replica[s.url] = delta(before[s.url], scrape(s.url))
    seen = sum(r.get("routing_seen", 0) for r in per_replica.values())
    new = sum(r.get("routing_new", 0) for r in per_replica.values())
    groups = len(set(owners))
    out: dict[str, Any] = {
        "mode": mode, "replicas": len(alive), "requests": len(work), "groups": groups,
        "answered": sum(1 for r in records if r["ok"]), "lost": len(work) - sum(1 for r in records if r["ok"]),
        "errors": errors[:5], "seconds": round(seconds, 2), "requests_per_s": round(len(work) / seconds, 2),
        "latency_p50_s": round(statistics.median(r["t1"] - r["t0"] for r in records), 3) if records else None,
        "latency_max_s": round(max(r["t1"] - r["t0"] for r in records), 3) if records else None,
        "affinity_ratio": round(seen / (seen + new), 4) if seen + new else None,
        "best_affinity_ratio": round(1 - groups / len(work), 4),
        "group_starts": int(new),  # = groups when every group stayed on one replica (surviving ones)
        "replicas_per_group": round(new / groups, 2) if groups else None,
        "groups_per_replica": {u: int(r.get("routing_new", 0)) for u, r in per_replica.items()},
        "uploads": int(sum(r.get("uploads", 0) for r in per_replica.values())),
        "client": {k: sum(s[k] for s in stats) for k in ("http_requests", "retries", "failovers")},
    }
    ph = sum(r.get("prefix_cache_hits", 0) for r in per_replica.values())
    pm = sum(r.get("prefix_cache_misses", 0) for r in per_replica.values())
    if ph + pm:
        out["prefix_hit_ratio"] = round(ph / (ph + pm), 4)  # hits / (hits + misses), as the dashboard
        out["prefixes_computed"] = int(pm)  # = groups when each group's prefix is computed once
        out["prefix_lookups_coalesced"] = int(sum(r.get("prefix_cache_coalesced", 0) for r in per_replica.values()))
    if victim is not None:
        out["killed"] = victim.url
        out["killed_groups"] = sum(1 for o in owners.values() if o == victim.url)
        if killed_at is not None:
            out["killed_after_requests"] = sum(1 for r in records if r["t1"] <= killed_at)
            # the dead replica's requests in flight at the kill: how long until all were answered elsewhere
            caught = [r["t1"] - killed_at for r in records if r["owner"] == victim.url and r["t0"] <= killed_at < r["t1"]]
            out["in_flight_at_kill"] = len(caught)
            out["recovery_s"] = round(max(caught), 3) if caught else None
            moved = [r["t1"] - r["t0"] for r in records if r["owner"] == victim.url and r["t0"] > killed_at]
            out["moved_latency_p50_s"] = round(statistics.median(moved), 3) if moved else None
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of bench/README.md from a run's results."""
    names = {("affinity", 1): "1 replica", ("affinity", 3): "3 replicas, `Client(replicas=...)`",
             ("random", 3): "3 replicas, random (plain Service)"}
    rows = ["| run | answered | req/s | p50 s | affinity ratio (best) | replicas per group | uploads | "
            "prefixes computed | prefix-cache hit ratio | failovers | recovery s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "3 replicas, one SIGKILLed after 1/3" if "killed" in r else names[(r["mode"], r["replicas"])]
        rows.append(
            f"| {name} | {r['answered']}/{r['requests']} | {r['requests_per_s']} | {r['latency_p50_s']} | "
            f"{r['affinity_ratio']} ({r['best_affinity_ratio']}) | {r['replicas_per_group']} | {r['uploads']} | "
            f"{r.get('prefixes_computed', 'n/a')} | {r.get('prefix_hit_ratio', 'n/a')} | {r['client']['failovers']} | "
            f"{r.get('recovery_s', '') if 'killed' in r else ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=12)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=6)
    ap.add_argument("--side", type=int, default=224, help="image side in pixels")
    ap.add_argument("--model", choices=("demo", "bench"), default="demo",
                    help="the embedded demo model, or the larger CPU bench model of bench/models.py")
    ap.add_argument("--serve-flag", action="append", default=[], metavar="NAME=VALUE",
                    help="a kawhi serve flag for every replica, e.g. cache_prefix_bytes=0")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="kawhi-bench-model-") as tmp:
        model_dir = None
        if a.model == "bench":
            from bench.models import build_reference, save_reference

            model_dir = save_reference(build_reference("bench"), Path(tmp) / "model")

        def work(tag: str) -> list[dict[str, Any]]:
            return workload(a.groups, a.samples, tag=tag, side=a.side)

        flags = dict(item.split("=", 1) for item in a.serve_flag)
        with replicas(1, model_dir=model_dir, flags=flags) as one:
            results.append(run(one, work("one-"), in_flight=a.in_flight))
        with replicas(3, model_dir=model_dir, flags=flags) as three:
            results.append(run(three, work("hrw-"), in_flight=a.in_flight))
            results.append(run(three, work("random-"), mode="random", in_flight=a.in_flight))
            results.append(run(three, work("kill-"), in_flight=a.in_flight, kill_after=1 / 3))
    for r in results:
        print(json.dumps(r))
    print(table(results))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
