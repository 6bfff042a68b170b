"""Group affinity on Ray Serve, on a local Ray (loopback): two replicas of ``kawhi.ray``'s
deployment, a GRPO workload sent one response per call through the ``DeploymentHandle``
(as a verl worker with ``RayBackend`` sends it), and which replica answered each call.

    python -m bench.ray_serve                                  # the table in bench/README.md
    python -m bench.ray_serve --groups 12 --samples 8 --in-flight 6 --out results.json

Three runs over the same workload shape (fresh prompts each run): the rendezvous router
(kawhi.ray.router, hashing the SDK's routing key); Ray's default router (power of two choices)
under the same load; the rendezvous router with one replica killed (``ray.kill``) after a third
of the calls, through ``RayBackend`` (which sends a call again when its replica dies). For each:
calls answered, throughput, median latency, the affinity ratio ``1 - (group, replica) pairs /
calls`` (the best possible is ``1 - groups / calls``, one replica per group; each pair is one
prefix computed and one image decoded on that replica) and how many replicas a group touched.

Ray is kept small (``--cpus``, no dashboard); the numbers are for the routing *shape*, not
capacity: on a small shared CPU machine two replicas share the same cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from bench.machine import loadavg, machine
from bench.replicas import workload
from bench.server import free_port


def _settings() -> Any:
    from kawhi.engine.engine import DEMO_MODEL_DIR
    from kawhi.settings import Settings

    return Settings(model=str(DEMO_MODEL_DIR), torch_threads=1, log_level="warning")


def run(handle: Any, requests: list[dict[str, Any]], in_flight: int, *, kill_after: int | None = None) -> dict[str, Any]:
    import ray
    from kawhi_client.integrations.ray_backend import RayBackend, group_key

    backend = RayBackend(handle, retries=8)
    served: list[tuple[str, str, float]] = []
    victim: str | None = None

    def call(request: dict[str, Any]) -> tuple[str, str, float]:
        t0 = time.perf_counter()
        if kill_after is None:
            answer = handle.reweight.remote([request], None, routing_key=group_key(request)).result(timeout_s=300)
            assert "response" in answer, answer
            return request["prompt"], answer["replica"], time.perf_counter() - t0
        result = backend.reweight([request], {})[0]  # through RayBackend: retried when the replica dies
        assert result.error is None, result.error
        return request["prompt"], "", time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
        futures = [pool.submit(call, r) for r in requests]
        if kill_after is not None:
            futures[kill_after].result()
            probe = requests[0]
            victim = handle.reweight.remote([probe], None, routing_key=group_key(probe)).result()["replica"]
            actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim))
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        served = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    groups: dict[str, set[str]] = {}
    for group, replica, _ in served:
        groups.setdefault(group, set()).add(replica)
    out: dict[str, Any] = {"answered": f"{len(served)}/{len(requests)}", "req_s": round(len(served) / wall, 2),
                           "p50_s": round(statistics.median(s for _, _, s in served), 3)}
    if kill_after is None:
        pairs = sum(len(r) for r in groups.values())
        out.update(affinity=round(1 - pairs / len(requests), 3), best=round(1 - len(groups) / len(requests), 3),
                   replicas_per_group=round(pairs / len(groups), 2))
    else:
        out.update(killed=victim, killed_after=kill_after + 1, calls_sent_again=backend.retried)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=6)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import ray
    from kawhi.ray.deployment import kawhi_app
    from ray import serve

    report: dict[str, Any] = {"command": "python -m bench.ray_serve " + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine(),
                              "loadavg_start": loadavg(), "runs": {}}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="kb", dir="/tmp"))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # loopback; the runs use the handle
        for name, router, kill in (("rendezvous", "rendezvous", False), ("ray-default", "default", False),
                                   ("rendezvous, 1 replica killed", "rendezvous", True)):
            t0 = time.perf_counter()
            app = f"kawhi-{len(report['runs'])}"  # a fresh name: a handle keeps the router of a name it has used
            handle = serve.run(kawhi_app(_settings(), replicas=2, router=router, name="kawhi",
                                         ray_actor_options={"num_cpus": args.cpus / 2}), name=app, route_prefix=None)
            deployed = time.perf_counter() - t0
            requests = workload(args.groups, args.samples, tag=name.split(",")[0] + str(kill))
            result = run(handle, requests, args.in_flight, kill_after=len(requests) // 3 if kill else None)
            result["deploy_s"] = round(deployed, 1)
            report["runs"][name] = result
            print(name, json.dumps(result), flush=True)
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["loadavg_end"] = loadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
