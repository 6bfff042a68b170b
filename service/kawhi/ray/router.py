"""The request router of the Ray Serve deployment: every request of a rollout group to one replica.

Ray Serve asks a deployment's ``RequestRouter`` which replicas may take a request, as ranks
(the first rank most preferred); it takes the first replica of a rank whose queue is not
full and that answers its probe, else tries the next rank. ``RendezvousRouter`` ranks the
running replicas by the rendezvous order of the request's routing key
(``kawhi_client.replicas.rank``, the function the SDK's ``Client(replicas=...)`` and the
Kubernetes ingress hash with), one replica per rank, so:

* all requests of a group (one routing key) land on the key's owner, where its image and
  prefix are held;
* keys move only when membership changes: a replica that leaves gives each of its keys to
  that key's next choice, one that joins takes a fair share; no other key moves;
* a replica that is full, does not answer, or died (Ray removes it from the running set)
  is passed over for the key's next choice.

The key comes from the ``routing_key`` keyword of a handle call (``RayBackend``), or from
the ``X-Kawhi-Routing-Key`` header of an HTTP request through Ray's proxy. A request with
no key goes to the least loaded replica (power of two choices, Ray's default).

The identity of a replica in the hash is its Serve replica id; a replica Ray starts in
place of a dead one is a new member (the dead one's keys stay on their next choices until
the rendezvous order gives some of them to the newcomer).
"""

from __future__ import annotations

import pickle
import random
from typing import Any

from kawhi_client.replicas import rank
from kawhi_client.routing import ROUTING_KEY_RE
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTING_KWARG = "routing_key"
_HEADER = b"x-kawhi-routing-key"


def routing_key_of(request: PendingRequest | None) -> str | None:
    """The request's routing key (a handle call's ``routing_key=``, or the HTTP header), if valid."""
    if request is None:
        return None
    key = request.kwargs.get(ROUTING_KWARG) if isinstance(request.kwargs, dict) else None
    if key is None and request.metadata.is_http_request and request.args:
        key = _header_key(request.args[0])
    return key if isinstance(key, str) and ROUTING_KEY_RE.match(key) else None


def _header_key(arg: Any) -> str | None:
    """The header from the proxy's pickled request (its ASGI scope; the body is not in it)."""
    try:
        scope = getattr(pickle.loads(arg) if isinstance(arg, bytes) else arg, "_asgi_scope", None)
    except Exception:  # not the proxy's request object: route as a request without a key
        return None
    if not isinstance(scope, dict):
        return None
    for name, value in scope.get("headers") or ():
        if name.lower() == _HEADER:
            return value.decode("latin-1").strip().lower()
    return None


def replica_name(replica: RunningReplica) -> str:
    """A replica's identity in the rendezvous hash."""
    return replica.replica_id.unique_id


class RendezvousRouter(RequestRouter):
    """Rank replicas by the rendezvous order of the request's routing key (see the module doc)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = routing_key_of(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        return [[replica] for replica in preference(key, candidate_replicas)]


def preference(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """``replicas`` in the key's rendezvous order (the SDK's ``rank`` over their names)."""
    by_name = {replica_name(r): r for r in replicas}
    return [by_name[name] for name in rank(key, by_name)]


ROUTER_PATH = f"{__name__}.RendezvousRouter"
DEFAULT_ROUTER_PATH = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"  # Ray's own default
