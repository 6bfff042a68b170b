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
* a replica that died leaves the running set at once; one that is full or does not answer
  Ray's queue probe is offered alone for a few turns (``OWNER_TURNS``), then passed over for
  the key's next choice.

It does not take Ray's ``FIFOMixin``: with it, a replica found for one request may be handed
to an older pending request of another group, which would undo the affinity.

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
        if pending_request is not None:  # when no rank took the request, Ray backs off before asking again
            pending_request.routing_context.should_backoff = True  # (instead of asking again at once)
        key = routing_key_of(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = preference(key, candidate_replicas)
        if pending_request is not None and owner_turns(pending_request) <= OWNER_TURNS:
            return [ranked[:1]]  # a live owner that is slow to answer its probe keeps its key
        return [[replica] for replica in ranked]


# Turns in which only the key's owner is offered. Ray probes a replica's queue with a deadline
# that doubles each turn (RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S, 0.1 s, up to 1 s): offering
# the next replica at once would move a group whenever its owner answers a probe late, which a
# busy CPU machine does often (measured: 1.5 replicas per group instead of 1). A dead owner
# leaves the candidates at once, so this only delays the fallback from a full or mute one.
OWNER_TURNS = 4


def owner_turns(request: PendingRequest) -> int:
    """Count one more routing turn of ``request`` (kept on its routing context)."""
    context = request.routing_context
    turns = getattr(context, "kawhi_owner_turns", 0) + 1
    context.kawhi_owner_turns = turns  # type: ignore[attr-defined]
    return turns


def preference(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """``replicas`` in the key's rendezvous order (the SDK's ``rank`` over their names)."""
    by_name = {replica_name(r): r for r in replicas}
    return [by_name[name] for name in rank(key, by_name)]


ROUTER_PATH = f"{__name__}.RendezvousRouter"
DEFAULT_ROUTER_PATH = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"  # Ray's own default
