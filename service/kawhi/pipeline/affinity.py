"""What a replica learns from the routing keys it is sent (``X-Kawhi-Routing-Key``,
see kawhi_client.routing): whether a request's group prefix was seen here before.

A request whose key this replica has seen recently is one whose image (and, with the
prefix cache, prefix states) this replica likely still holds; a new key is a group
that starts here. ``kawhi_routing_requests_total{key="seen"|"new"|"none"}`` counts
them, so ``seen / (seen + new)`` per replica is its affinity ratio: with every group's
requests on one replica it equals what a single replica would see, ``1 - groups /
requests``; when the groups are spread over replicas it drops. The keys are held in a
bounded LRU (no per-key label: the metric's cardinality stays fixed).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from kawhi_client.routing import ROUTING_KEY_RE

SEEN_KEYS_CAPACITY = 65_536


class SeenKeys:
    """A bounded LRU of routing keys; ``observe`` says ``seen``, ``new`` or ``none``
    (no key, or not a well-formed one: the key is advisory and never refused)."""

    def __init__(self, capacity: int = SEEN_KEYS_CAPACITY) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, raw: str | None) -> str:
        key = (raw or "").strip().lower()
        if not ROUTING_KEY_RE.match(key):
            return "none"
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return "seen"
            self._keys[key] = None
            if len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
            return "new"
