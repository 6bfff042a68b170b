"""The Ray Serve deployment: one replica = one serving core (``ReweightService``) over one
reference model, reachable over HTTP (Ray's proxy, the same FastAPI app as ``kawhi serve``)
and through its ``DeploymentHandle`` (``reweight``/``info``, plain Python, see kawhi.ray.handle).

``kawhi_app(settings, replicas=2, ...)`` is the bound application: ``serve.run(kawhi_app(...))``
or ``kawhi ray serve``. Each replica:

* builds ``ReweightService(settings)`` with the settings ``kawhi serve`` would use (the driver
  resolves flags, ``KAWHI_*`` and defaults once; the replicas get the result), and the app of
  ``kawhi.server.app.create_app`` over it: the same routes, errors, probes and metrics;
* starts it in the app's lifespan and joins the routing set only once the model is loaded (a
  model that does not load fails the replica's start with the reason, as ``kawhi serve`` exits 1);
* answers Ray's health check from the service's phase (a failed service is replaced);
* drains on stop: Ray stops routing to it, then the lifespan's shutdown drains the service
  within ``drain_timeout_s``.

Requests reach replicas through ``kawhi.ray.router.RendezvousRouter`` (or Ray's default
router when ``router="default"``, for comparison).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from kawhi.errors import KawhiError
from kawhi.pipeline.service import ReweightService
from kawhi.ray.handle import PYTHON, parse_handle_groups, problem_of
from kawhi.ray.router import DEFAULT_ROUTER_PATH, ROUTER_PATH
from kawhi.server.app import create_app

ROUTERS = {"rendezvous": ROUTER_PATH, "default": DEFAULT_ROUTER_PATH}
LOAD_POLL_S = 0.05
REPLICA_HEADER = b"x-kawhi-replica"


async def wait_loaded(service: ReweightService) -> None:
    """Until the model is loaded; RuntimeError with the reason when it fails to load."""
    while service.phase == "loading":
        await asyncio.sleep(LOAD_POLL_S)
    if service.phase == "failed":
        raise RuntimeError(f"kawhi: cannot load the model: {service.load_error}")


@serve.ingress()
class KawhiReplica:
    """One replica (see the module doc). Its HTTP routes are ``create_app``'s."""

    def __init__(self, settings: Any) -> None:
        from kawhi.logs import configure_logging

        configure_logging(settings.log_level, settings.log_json)
        self.service = ReweightService(settings)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(service=self.service)
        started = app.router.lifespan_context  # the service's own start and stop

        @asynccontextmanager
        async def lifespan(asgi_app: Any) -> AsyncIterator[None]:
            async with started(asgi_app):
                await wait_loaded(self.service)
                yield

        app.router.lifespan_context = lifespan
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    async def check_health(self) -> None:
        if self.service.phase == "failed":
            raise RuntimeError(f"kawhi: the model failed to load: {self.service.load_error}")

    async def reweight(self, groups: Any, options: Any = None, *, per_group_errors: bool = True,
                       routing_key: str | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Handle call: groups (image bytes as ``bytes``) -> ``{"response": ...}`` or ``{"problem": ...}``.
        ``routing_key`` is read by the router; here it is counted as the HTTP header is."""
        service = self.service
        service.metrics.observe_routing_key(routing_key)
        try:
            service.require_engine()
            if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
                raise KawhiError("validation", "timeout_s must be a positive number of seconds")
            deadline = service.deadline(timeout_s)
            service.enter()
            try:
                admission = await service.admit_parsed(
                    lambda: parse_handle_groups(groups, options, per_group_errors),
                    len(groups) if isinstance(groups, (list, tuple)) else 0)  # not a list: parse says so (422)
                answer = await service.reweight(admission, deadline, PYTHON)
            finally:
                service.leave()
        except KawhiError as err:
            service.count_error(err)
            return problem_of(err)
        return {"response": answer.payload, "replica": self.replica}

    async def info(self) -> dict[str, Any]:
        try:
            return {"info": self.service.info().to_dict()}
        except KawhiError as err:
            return problem_of(err)


class ReplicaHeader:
    """ASGI middleware: every HTTP answer says ``X-Kawhi-Replica: <replica id>`` (which replica
    the router chose; the handle's answers carry it as ``replica``)."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER, replica.encode("latin-1"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def kawhi_app(settings: Any, *, replicas: int = 1, router: str = "rendezvous", name: str = "kawhi",
              ray_actor_options: dict[str, Any] | None = None, max_ongoing_requests: int | None = None) -> Any:
    """The bound Serve application of ``replicas`` kawhi replicas (``serve.run(...)`` it).

    ``router``: ``rendezvous`` (group affinity, kawhi.ray.router) or ``default`` (Ray's power of
    two choices). ``ray_actor_options``: per replica, e.g. ``{"num_gpus": 1}`` for one
    reference model per GPU (default: one CPU). ``max_ongoing_requests``: requests a replica
    takes at once before the router passes it over (default: its queue, ``queue_groups``).
    """
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {router!r}")
    deployment = serve.deployment(
        KawhiReplica,
        name=name,
        num_replicas=replicas,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        max_ongoing_requests=max_ongoing_requests or settings.queue_groups,
        graceful_shutdown_timeout_s=settings.drain_timeout_s + 5,
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[router]),
    )
    return deployment.bind(settings)
