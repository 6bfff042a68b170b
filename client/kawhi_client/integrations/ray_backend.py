"""``RayBackend``: the KAWHI deployment on Ray Serve through its ``DeploymentHandle``.

A verl worker is a Ray actor in the cluster that runs the ``kawhi`` Serve application
(``kawhi ray serve``, docs/operations.md "Ray Serve"); it calls the replicas directly, no
HTTP: the groups go as Python objects with the image as the encoded file's ``bytes`` (no
JSON, no base64) and the answer comes back as a dict. ``RayBackend(handle)`` takes a handle
(``serve.get_app_handle("kawhi")``); ``RayBackend.from_url("ray://kawhi")`` (or the URL as a
backend, ``kawhi="ray://kawhi"``) looks the application up by name on first use.

Each call carries its group's routing key (``kawhi_client.routing``), which the deployment's
router hashes on: every request of a group lands on the replica that holds its prefix. The
groups of one ``reweight`` are sent as one call per routing key, all in flight at once.

A replica that dies under a call, or answers 503/429, is retried (``retries`` times, waiting
the answer's Retry-After, at most ``max_wait_s``): the router sends the retry to the key's
next replica. Other problems raise the SDK's typed errors (``InvalidRequest`` ...), and
per-group problems come back in the group's ``error`` as over HTTP.

Ray is imported when a handle is first needed: this module loads without it. Nothing of
the service package is imported: the handle carries builtins only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any

from kawhi_client.errors import KawhiError, error_class
from kawhi_client.routing import routing_key
from kawhi_client.schema import GroupResult, Problem

RAY_SCHEME = "ray://"
RETRY_STATUSES = (429, 503)


def group_key(group: Mapping[str, Any]) -> str | None:
    """The routing key of a group whose image is bytes or a sha256 reference; None otherwise."""
    image = group.get("image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        sha = hashlib.sha256(image).hexdigest()
    elif isinstance(image, Mapping) and isinstance(image.get("sha256"), str):
        sha = image["sha256"]
    else:
        return None
    return routing_key(sha, group.get("prompt"), group.get("messages"))


class RayBackend:
    """The ``kawhi`` Serve application through a ``DeploymentHandle`` (see the module doc)."""

    kind = "ray"

    def __init__(self, handle: Any = None, *, app_name: str = "kawhi", timeout_s: float = 120.0,
                 retries: int = 4, max_wait_s: float = 5.0) -> None:
        self._handle = handle
        self.app_name = app_name
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.max_wait_s = float(max_wait_s)
        self.retried = 0  # calls sent again (a replica died or was busy), for a caller's own counts

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RayBackend:
        """``ray://<application name>`` (``ray://kawhi``)."""
        if not url.startswith(RAY_SCHEME) or not url[len(RAY_SCHEME):].strip("/"):
            raise ValueError(f"expected ray://<Serve application name>, got {url!r}")
        return cls(app_name=url[len(RAY_SCHEME):].strip("/"), **kwargs)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_app_handle(self.app_name)
        return self._handle

    # ------------------------------------------------------------------ calls
    def reweight(self, groups: list[dict[str, Any]], options: dict[str, Any]) -> list[GroupResult]:
        by_key: dict[Any, list[int]] = {}
        for i, group in enumerate(groups):
            key = group_key(group) if isinstance(group, Mapping) else None
            by_key.setdefault(key if key is not None else ("no-key", i), []).append(i)
        calls = {key: self._send("reweight", [groups[i] for i in idx], options or None,
                                 routing_key=key if isinstance(key, str) else None)
                 for key, idx in by_key.items()}
        results: list[GroupResult | None] = [None] * len(groups)
        for key, idx in by_key.items():
            answer = self._answer(calls[key], "reweight", [groups[i] for i in idx], options or None,
                                  routing_key=key if isinstance(key, str) else None)
            for i, raw in zip(idx, answer["response"]["results"]):
                results[i] = GroupResult.model_validate(raw)
        return [r for r in results if r is not None]

    def info(self) -> dict[str, Any]:
        return self._answer(self._send("info"), "info")["info"]

    def _send(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "reweight":
            kwargs["timeout_s"] = self.timeout_s
        return getattr(self.handle, method).remote(*args, **kwargs)

    def _answer(self, pending: Any, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The call's answer, retried on a replica that died or was busy (see the module doc)."""
        from ray.exceptions import ActorUnavailableError, RayActorError

        attempt = 1
        while True:
            wait: float | None = None
            try:
                answer = pending.result(timeout_s=self.timeout_s)
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt > self.retries:
                    raise KawhiError(f"the kawhi replica went away {attempt} time(s): {exc}") from exc
                wait = 0.0
            else:
                problem = answer.get("problem")
                if problem is None:
                    return answer
                parsed = Problem.model_validate(problem)
                if parsed.status not in RETRY_STATUSES or attempt > self.retries:
                    raise error_class(parsed.status, parsed)(parsed, attempts=attempt,
                                                             retry_after=_seconds(answer.get("retry_after")))
                wait = min(self.max_wait_s, _seconds(answer.get("retry_after")) or 1.0)
            time.sleep(wait)
            attempt += 1
            self.retried += 1
            pending = self._send(method, *args, **kwargs)

    def __repr__(self) -> str:
        return f"RayBackend({RAY_SCHEME}{self.app_name})"


def _seconds(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
