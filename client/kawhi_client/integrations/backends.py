"""Backends of the trainer integrations: what answers ``reweight(groups, options)``.

* ``HttpBackend`` — a ``kawhi_client.Client`` talking to ``kawhi serve`` (images
  uploaded once, retries, timeouts that grow with the work: see docs/client.md);
* ``InProcessBackend`` — a ``kawhi.engine.Engine`` inside the trainer process, no HTTP
  (for users with the memory to hold the reference model next to the policy); the
  image bytes go to the engine as they are, never through base64.

``as_backend`` makes one from what a user has at hand (a URL, a Client, an Engine).
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from typing import Any, Protocol, runtime_checkable

from kawhi_client.schema import GroupResult


@runtime_checkable
class Backend(Protocol):
    """Anything that reweights wire groups: ``reweight(groups, options) -> list[GroupResult]``.

    ``groups`` are docs/api.md rollout groups as dicts, except that ``image`` may be the
    encoded file as ``bytes``; ``options`` is a dict of API options. One result per
    group, in order; a group the service refused has ``error`` set.
    """

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]: ...


class HttpBackend:
    """The KAWHI HTTP service through ``kawhi_client.Client``.

    ``client``: a ``Client``, or the service URL (``None``: ``$KAWHI_URL`` or
    http://127.0.0.1:8000), in which case ``client_kwargs`` go to ``Client`` (timeouts,
    retries, ``api_key`` ...). Requests use ``per_group_errors=True``, so one bad group
    never hides the results of the others; the policy then decides about that group.
    """

    kind = "http"

    def __init__(self, client: Any = None, **client_kwargs: Any) -> None:
        from kawhi_client.client import Client

        if client is None or isinstance(client, (str, os.PathLike)):
            client = Client(None if client is None else str(client), **client_kwargs)
        elif client_kwargs:
            raise TypeError("client_kwargs are for a Client this backend creates, not for one passed in")
        self.client = client

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        return self.client.reweight(groups, options=options or None, per_group_errors=True)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"HttpBackend({self.client.base_url!r})"


class InProcessBackend:
    """The KAWHI engine inside this process: no HTTP, no server.

    ``engine``: a loaded ``kawhi.engine.engine.Engine`` (or a ``kawhi.pipeline.local.LocalService``
    over one); when None, one is loaded with
    ``Engine.load(model, **load_kwargs)`` (``model=None``: the embedded kawhi-tiny model —
    trained on a synthetic task, docs/tiny.md: for trying kawhi, not a real reference). The engine is not thread-safe; calls
    are serialised by a lock.
    """

    kind = "in-process"

    def __init__(self, engine: Any = None, *, model: Any = None, **load_kwargs: Any) -> None:
        if engine is None:
            from kawhi.engine.engine import Engine

            engine = Engine.load(model, **load_kwargs)
        elif model is not None or load_kwargs:
            raise TypeError("model/load_kwargs are for an engine this backend loads, not for one passed in")
        from kawhi.pipeline.local import LocalService

        self.local = engine if isinstance(engine, LocalService) else LocalService(engine)
        self.engine = self.local.engine
        self._lock = threading.Lock()

    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        # Image bytes stay bytes: each group names its image by sha256 and the engine's
        # image loader answers with the very bytes the trainer gave (no base64 round trip).
        held: dict[str, bytes] = {}
        wire = []
        for group in groups:
            image = group.get("image")
            if isinstance(image, (bytes, bytearray, memoryview)):
                data = bytes(image)
                sha = hashlib.sha256(data).hexdigest()
                held[sha] = data
                group = {**group, "image": {"sha256": sha}}
            wire.append(group)
        with self._lock:
            return self.local.reweight(wire, options or None, load_image=functools.partial(_held_image, held))

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    def __repr__(self) -> str:
        return f"InProcessBackend({getattr(self.engine, 'model_name', type(self.engine).__name__)!r})"


def as_backend(obj: Any) -> Any:
    """A backend from what a user naturally has at hand.

    * a backend (anything with ``reweight(groups, options)``) — used as is;
    * a ``kawhi_client.Client`` — wrapped in ``HttpBackend``;
    * a ``kawhi.engine.engine.Engine`` — wrapped in ``InProcessBackend``;
    * a URL string (``"http://kawhi:8000"``) — ``HttpBackend(url)``;
    * ``"in-process"`` — ``InProcessBackend()`` (the embedded kawhi-tiny model, docs/tiny.md);
    * ``"ray://kawhi"`` or a Ray Serve ``DeploymentHandle`` — ``RayBackend`` (kawhi on Ray Serve,
      called through the handle: image bytes as bytes, no HTTP).
    """
    if obj is None:
        raise TypeError("a KAWHI backend is required: a URL, a kawhi_client.Client, a kawhi Engine, "
                        "HttpBackend(...) or InProcessBackend(...)")
    if isinstance(obj, (HttpBackend, InProcessBackend)):
        return obj
    if isinstance(obj, str):
        if obj in ("in-process", "inprocess", "in_process"):
            return InProcessBackend()
        if obj.startswith(("http://", "https://")):
            return HttpBackend(obj)
        if obj.startswith("ray://"):
            from kawhi_client.integrations.ray_backend import RayBackend

            return RayBackend.from_url(obj)
        raise ValueError(f"backend string {obj!r}: expected an http(s):// URL, ray://<app> or 'in-process'")
    from kawhi_client.client import Client

    if isinstance(obj, Client):
        return HttpBackend(obj)
    module = type(obj).__module__ or ""
    if module.startswith("ray.serve") and type(obj).__name__ == "DeploymentHandle":
        from kawhi_client.integrations.ray_backend import RayBackend

        return RayBackend(obj)
    if module.startswith("kawhi.engine") and hasattr(obj, "prepare") and hasattr(obj, "run"):
        return InProcessBackend(obj)
    if callable(getattr(obj, "reweight", None)):
        return obj
    raise TypeError(f"cannot use {type(obj).__name__} as a KAWHI backend")


def _held_image(held: dict[str, bytes], ref: Any) -> bytes:
    """The engine's image loader for ``InProcessBackend``: bytes the trainer handed over,
    by sha256; anything else (``data``, ``path``) as the engine loads it by default."""
    if ref.sha256 is not None and ref.sha256 in held:
        return held[ref.sha256]
    from kawhi.engine.engine import load_image_bytes

    return load_image_bytes(ref)
