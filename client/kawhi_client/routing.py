"""The routing key of a rollout group: where its shared prefix lives among replicas.

Every response of a group continues the same prefix (the image's visual tokens and the
prompt). A replica that has served one response of the group holds that prefix (its
image, and with the prefix cache its key/value states); the other responses are
cheaper there than anywhere else. The routing key names that prefix, so a client,
an ingress or a router can send all of a group's requests to one replica.

The key is a pure function of what defines the prefix, computed the same way by every
front end (HTTP and gRPC clients, trainer integrations):

    sha256("kawhi-route/1" NUL <image sha256, lower-case hex> NUL <kind> NUL <text>)[:32 hex]

where ``kind`` is ``prompt`` and ``text`` the prompt string, or ``kind`` is
``messages`` and ``text`` their canonical JSON (sorted keys, no spaces, UTF-8). The
responses, rewards and options are not part of it: they do not change the prefix.

It travels as the HTTP header ``X-Kawhi-Routing-Key`` (gRPC metadata
``x-kawhi-routing-key``). A request that carries several groups sends the key of its
first group. The key is advisory: a server never rejects a request for it, and a
request without it is served the same.

No I/O, no third-party imports: the gRPC client and other front ends import this
module as it is.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

ROUTING_HEADER = "X-Kawhi-Routing-Key"
GRPC_METADATA_KEY = "x-kawhi-routing-key"  # gRPC metadata keys are lower-case
ROUTING_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_VERSION = b"kawhi-route/1"


def canonical_messages(messages: Any) -> str:
    """The canonical JSON of chat messages (sorted keys, no spaces, non-ASCII kept)."""
    return json.dumps(messages, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def routing_key(image_sha256: str, prompt: str | None = None, messages: Any = None) -> str:
    """The routing key (32 lower-case hex characters) of a group with this image and
    this prompt (or these chat messages; the prompt wins when both are given)."""
    if prompt is not None:
        kind, text = b"prompt", str(prompt)
    elif messages is not None:
        kind, text = b"messages", canonical_messages(messages)
    else:
        kind, text = b"none", ""
    h = hashlib.sha256()
    for part in (_VERSION, image_sha256.strip().lower().encode("ascii", "replace"), kind,
                 text.encode("utf-8", "surrogatepass")):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:32]


def group_routing_key(group: Mapping[str, Any]) -> str | None:
    """The routing key of a wire group whose image is given by hash
    (``{"image": {"sha256": ...}, "prompt": ...}``); None when it has no hash."""
    image = group.get("image")
    sha = image.get("sha256") if isinstance(image, Mapping) else None
    if not isinstance(sha, str) or not sha:
        return None
    return routing_key(sha, group.get("prompt"), group.get("messages"))


def request_routing_key(keys: Sequence[str | None]) -> str | None:
    """The key a request carries: that of its first group that has one."""
    return next((k for k in keys if k), None)
