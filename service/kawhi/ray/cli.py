"""``kawhi ray serve``: the kawhi Serve application on a Ray cluster (docs/operations.md "Ray Serve").

Every ``kawhi serve`` flag (and ``KAWHI_*`` variable) means the same here; ``--host``/``--port``
are those of Ray Serve's HTTP proxy. The Ray flags say where and how wide: ``--address``
(a running cluster; unset: ``RAY_ADDRESS``, else a local Ray of ``replicas x replica-cpus`` CPUs is started), ``--replicas``,
the resources of one replica (``--replica-gpus``, ``--replica-cpus``, ``--replica-memory-gb``)
and ``--router``. The command deploys, prints where the application answers, and waits;
SIGTERM or Ctrl-C deletes the application (Ray drains each replica) and exits 0.
``--detach`` leaves the application running on the cluster and returns at once.

Ray is imported only when the command runs: ``kawhi --help`` works without the extra.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from typing import Any

ROUTER_CHOICES = ("rendezvous", "default")


def add_ray_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ray serve`` on the ``kawhi`` CLI's subparsers."""
    from kawhi.serve import add_serve_parser

    ray = subparsers.add_parser("ray", help="run kawhi on a Ray cluster with Ray Serve (needs kawhi-rl[ray])")
    sub = ray.add_subparsers(dest="ray_command", required=True, metavar="{serve}")
    serve = add_serve_parser(sub)
    serve.description = ("Deploy kawhi as a Ray Serve application: N replicas of the serving core behind Ray's "
                         "HTTP proxy (--host/--port) and a DeploymentHandle, routed by group (rendezvous hashing on "
                         "the routing key). Every kawhi serve flag and KAWHI_* variable applies.")
    group = serve.add_argument_group("ray")
    group.add_argument("--address", default=argparse.SUPPRESS,
                       help="the Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray)")
    group.add_argument("--replicas", type=int, default=1, help="replicas (one reference model each)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (1 on a GPU cluster)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica")
    group.add_argument("--replica-memory-gb", type=float, default=argparse.SUPPRESS,
                       help="memory Ray reserves per replica (default: none reserved)")
    group.add_argument("--router", choices=ROUTER_CHOICES, default="rendezvous",
                       help="rendezvous: a group's requests to one replica; default: Ray's power of two choices")
    group.add_argument("--app-name", default="kawhi", help="the Serve application (ray://<name> for RayBackend)")
    group.add_argument("--detach", action="store_true", help="deploy and return; the application keeps running")
    serve.set_defaults(func=run_ray_serve)
    return serve


def actor_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": args.replica_cpus}
    if args.replica_gpus:
        options["num_gpus"] = args.replica_gpus
    if getattr(args, "replica_memory_gb", None):
        options["memory"] = int(args.replica_memory_gb * 1024 ** 3)
    return options


def run_ray_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kawhi.serve import settings_from_args

    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"kawhi ray serve: invalid settings: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    if settings.grpc_port is not None:
        print("kawhi ray serve: --grpc-port is not served on Ray (HTTP and the DeploymentHandle are); "
              "run kawhi serve for gRPC", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print("kawhi ray serve: --replicas must be at least 1", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from kawhi.ray.deployment import kawhi_app

    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:  # a local Ray sized to the application (GPUs as Ray detects them)
        ray.init(num_cpus=max(1, math.ceil(args.replicas * args.replica_cpus)), include_dashboard=False)
    stop = threading.Event()  # after ray.init, whose driver handlers would exit on SIGTERM without deleting the app
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = kawhi_app(settings, replicas=args.replicas, router=args.router, name=args.app_name,
                    ray_actor_options=actor_options(args))
    try:
        serve.run(app, name=args.app_name, route_prefix="/")
    except RuntimeError as exc:  # a replica that cannot start (the model does not load): the reason is in its log
        print(f"kawhi ray serve: the application did not start: {str(exc).splitlines()[0]}", file=sys.stderr)
        serve.delete(args.app_name)
        return 1
    print(f"kawhi ray serve: {args.replicas} replica(s) at http://{settings.host}:{settings.port} "
          f"and ray://{args.app_name}", flush=True)
    if args.detach:
        return 0
    stop.wait()
    serve.delete(args.app_name)  # Ray stops routing to the replicas, then each drains
    return 0
