"""Time to answer with one of three replicas hung: the replica that owns a fresh group is
SIGSTOPped (its TCP still accepts; nothing answers), the group is sent through the SDK
(``Client`` over HTTP, ``GrpcClient`` over gRPC, ``replicas=`` the three), and the
replica is SIGCONTed after. Three settings per front end: the defaults
(``failover_timeout=20``), a short failover (``failover_timeout=2``), and no failover
timeout (``failover_timeout=None``, ``timeout=4, retries=1``: what the SDK did before
issue 26: every attempt waits the full read timeout on the stopped replica). After the
first call, a second fresh group owned by the still-stopped replica shows the skip (the
replica is marked down for 30 s).

    python -m bench.hung_replica                       # both front ends, the table in bench/README.md
    python -m bench.hung_replica --front grpc --out results.json

Three ``kawhi serve`` replicas (demo model, one torch thread each) with HTTP and gRPC
listeners on loopback ports; the test ``tests/grpc/test_grpc_replicas.py`` runs the same
steps with short timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from typing import Any

from kawhi_client import Client, GrpcClient, KawhiError
from kawhi_client.replicas import rank

from bench.replicas import key_of, replicas, workload
from bench.server import Server

SETTINGS = {
    "defaults (timeout=60, failover_timeout=20)": {},
    "failover_timeout=2": {"failover_timeout": 2.0},
    "no failover timeout (timeout=4, retries=1)": {"failover_timeout": None, "timeout": 4.0, "retries": 1,
                                                  "backoff": 0.0},
}


def replica_id(server: Server, front: str) -> str:
    """The server as the client names it among its replicas (the rendezvous identity)."""
    return server.url if front == "http" else f"grpc://{server.grpc_target}"


def client(servers: list[Server], front: str, **kw: Any) -> Client | GrpcClient:
    if front == "http":
        return Client(replicas=[s.url for s in servers], wait_ready=False, **kw)
    return GrpcClient(replicas=[s.grpc_target for s in servers], wait_ready=False, **kw)


def fresh_request_owned_by(servers: list[Server], front: str, victim: Server | None, tag: str) -> dict[str, Any]:
    """A one-sample group whose key ranks ``victim`` first (any replica when None)."""
    ids = [replica_id(s, front) for s in servers]
    for n in range(200):
        request = workload(1, 1, tag=f"{tag}{n}-")[0]
        if victim is None or rank(key_of(request), ids)[0] == replica_id(victim, front):
            return request
    raise AssertionError("no key of 200 ranks the victim first")


def answer_with_owner_stopped(servers: list[Server], front: str, tag: str, second_call: bool = False,
                              **client_kw: Any) -> dict[str, Any]:
    """SIGSTOP the owner of a fresh group, send it (and, with ``second_call``, a second
    group owned by the same stopped replica), SIGCONT: seconds to each answer, the outcome,
    the client's stats."""
    request = fresh_request_owned_by(servers, front, None, tag)
    ids = [replica_id(s, front) for s in servers]
    victim = next(s for s in servers if replica_id(s, front) == rank(key_of(request), ids)[0])
    assert victim.proc is not None and victim.proc.poll() is None
    out: dict[str, Any] = {"front": front}
    os.killpg(victim.proc.pid, signal.SIGSTOP)  # the server runs in a session of its own
    try:
        with client(servers, front, **client_kw) as c:
            t0 = time.perf_counter()
            try:
                results = c.reweight([request])
                out["outcome"] = "answered" if results[0].id == request["id"] else f"wrong id {results[0].id}"
            except KawhiError as exc:
                out["outcome"] = type(exc).__name__
                out["error"] = str(exc)
            out["seconds"] = round(time.perf_counter() - t0, 2)
            if second_call and out["outcome"] == "answered":
                again = fresh_request_owned_by(servers, front, victim, tag + "again-")
                t0 = time.perf_counter()
                c.reweight([again])
                out["second_call_seconds"] = round(time.perf_counter() - t0, 2)
            out["stats"] = c.stats.snapshot()
    finally:
        os.killpg(victim.proc.pid, signal.SIGCONT)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| front end | setting | outcome | time to answer s | replica timeouts | failovers | attempts | "
             "next call to the stopped replica's key s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["stats"]
        lines.append(f"| {r['front']} | {r['setting']} | {r['outcome']} | {r['seconds']} | {st['replica_timeouts']} | "
                     f"{st['failovers']} | {st['http_requests']} | {r.get('second_call_seconds', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--front", choices=("http", "grpc", "both"), default="both")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    fronts = ("http", "grpc") if args.front == "both" else (args.front,)
    rows = []
    with replicas(3, grpc=True) as servers:
        for front in fronts:
            for k, (setting, kw) in enumerate(SETTINGS.items()):
                row = answer_with_owner_stopped(servers, front, f"{front}{k}-", second_call=True, **kw)
                row["setting"] = setting
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
