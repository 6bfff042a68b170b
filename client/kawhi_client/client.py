"""``Client`` and ``AsyncClient``: the KAWHI HTTP API (docs/api.md) from Python.

Both share one constructor (``_Base``) and every operation (``kawhi_client.core``: the
operations are generator jobs that yield what they need done); each class is a driver
(``kawhi_client.drivers``: threads or tasks) that sends each call with ``httpx.Client``
or ``httpx.AsyncClient``. Configuration and the
server's limits live in ``kawhi_client.config``, request planning in
``kawhi_client.planning``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx

from kawhi_client.actions import Call
from kawhi_client.config import (
    DEFAULT_FAILOVER_TIMEOUT_S,
    ClientConfig,
    ClientStats,
    Limits,
    RetryPolicy,
    Timeouts,
    parse_retry_after,
    ready_timeout,
    request_headers,
    resolve_base_url,
    retry_policy,
    unreachable_grace,
)
from kawhi_client.core import Core, CoreViews
from kawhi_client.drivers import AsyncDriver, SyncDriver
from kawhi_client.planning import GroupLike, OptionsLike, wire_fields
from kawhi_client.schema import GroupResult, ReweightResponse

__all__ = ["AsyncClient", "Client", "ClientConfig", "ClientStats", "Limits", "RetryPolicy", "Timeouts",
           "parse_retry_after"]

class _Base(CoreViews):
    """What ``Client`` and ``AsyncClient`` share: the constructor and the read-only views."""

    _core: Core

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        timeout_per_token: float = 0.002,
        connect_timeout: float = 10.0,
        max_in_flight: int = 4,
        retries: int | RetryPolicy | None = 5,
        backoff: float = 0.5,
        wait_ready: bool | float = True,
        max_groups_per_request: int | None = None,
        headers: Mapping[str, str] | None = None,
        encoding_format: str = "float",
        token_arrays: bool = True,
        verify: Any = True,
        replicas: str | Sequence[str] | None = None,
        resolve_every: float = 30.0,
        shared_image_cache: bool = False,
        failover_timeout: float | None = DEFAULT_FAILOVER_TIMEOUT_S,
    ) -> None:
        """Connect to a KAWHI service (nothing is sent until the first call).

        Args:
            base_url: the service, e.g. ``http://kawhi:8000`` (default: ``$KAWHI_URL`` or
                ``http://127.0.0.1:8000``).
            api_key: bearer key (default: ``$KAWHI_API_KEY``; none = no auth header).
            timeout: base seconds of every timeout; the read timeout of a request is
                ``timeout + timeout_per_token * estimated tokens`` (grows with the work sent).
            timeout_per_token: seconds of read timeout added per estimated token.
            connect_timeout: seconds to make a connection.
            max_in_flight: requests in flight at once, retries included (per client).
            retries: retries of a transient failure (int), or a full ``RetryPolicy``.
            backoff: base seconds of the exponential backoff (when ``retries`` is an int).
            wait_ready: before the first call wait for ``/readyz``: True (a server that
                answers "loading" up to 600 s, but a URL where nothing listens fails after
                5 s: a wrong URL or port), a number of seconds (wait that long, also for a
                server that does not listen yet: start-up alongside the server), or False
                (do not wait). The wait logs a warning every 30 s (logger ``kawhi_client``).
            max_groups_per_request: cap the groups per request below the server's limit.
            headers: extra HTTP headers on every request.
            encoding_format: ``"float"`` (JSON numbers) or ``"base64"`` (per-token arrays as
                little-endian float32, ~4x fewer bytes; decoded to lists transparently).
            token_arrays: False asks for no per-token arrays (``token_advantages`` and
                ``token_weights`` are None; the paragraphs carry spans and weights).
            verify: TLS verification, as httpx takes it.
            replicas: several replicas of the service instead of one ``base_url``: a list
                of base URLs (or one comma-separated string), or ``dns+http://NAME:PORT``
                for a headless Service whose addresses are looked up again every
                ``resolve_every`` seconds. Each group goes to the replica that rendezvous
                hashing on its routing key picks, with failover (see docs/client.md).
            resolve_every: seconds between DNS lookups of a ``dns+`` replica name.
            shared_image_cache: the replicas share one image store (Redis): upload each
                image once instead of once per replica that uses it.
            failover_timeout: with several replicas, seconds (plus ``timeout_per_token`` per
                estimated token) an attempt waits for its replica before it moves to the
                next healthy one, which is then skipped for 30 s: a hung replica costs a
                call this long. None: wait the full read timeout (a retry goes back to it).
        """
        if replicas is not None:
            from kawhi_client.replicas import ReplicaSet

            probe = ReplicaSet(replicas, resolve_every=resolve_every)  # checks the spec now
            if base_url is None:
                base_url = probe.urls[0] if probe.urls else f"{probe.dns.scheme}://{probe.dns.host}:{probe.dns.port}"
        config = ClientConfig(
            base_url=resolve_base_url(base_url),
            headers=request_headers(api_key, headers),
            timeouts=Timeouts(base=timeout, per_token=timeout_per_token, connect=connect_timeout,
                              failover=failover_timeout),
            retry=retry_policy(retries, backoff),
            max_in_flight=max_in_flight,
            ready_timeout=ready_timeout(wait_ready),
            unreachable_grace=unreachable_grace(wait_ready),
            max_groups_per_request=max_groups_per_request,
            verify=verify,
            replicas=replicas,
            resolve_every=resolve_every,
            shared_image_cache=shared_image_cache,
            wire=wire_fields(encoding_format, token_arrays),
        )
        self._core = Core(config)
        self._open(config)

    def _open(self, config: ClientConfig) -> None:
        """Create the HTTP transport and the in-flight slots (sync or async)."""
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        return self._core.base_url

    @property
    def replicas(self) -> tuple[str, ...]:
        """The replicas' base URLs (several replicas), or ``(base_url,)``."""
        rs = self._core.replicas
        return rs.urls if rs is not None else (self._core.base_url,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._core.base_url!r}, max_in_flight={self._core.max_in_flight})"


def _url(action: Call) -> str:
    return action.endpoint + action.path if action.endpoint else action.path


class Client(_Base, SyncDriver):
    """Synchronous client of the KAWHI service (thread-safe; a context manager).

    ``reweight(groups, **options)`` -> ``list[GroupResult]`` in input order.
    """

    def _open(self, config: ClientConfig) -> None:
        self._http = httpx.Client(
            base_url=config.base_url, headers=dict(config.headers), limits=config.http_limits(),
            verify=config.verify, follow_redirects=False,
        )
        self._slots = threading.BoundedSemaphore(config.max_in_flight)

    # ------------------------------------------------------------------ API
    def reweight(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: str | None = None,
        **option_kwargs: Any,
    ) -> list[GroupResult]:
        """Reweight rollout groups; one ``GroupResult`` per group, in input order.

        ``groups``: ``RolloutGroup`` models or dicts of the wire shape; ``image`` may be
        bytes, a local path, ``{"data": base64}``, ``{"path": ...}`` or ``{"sha256": ...}``.
        Options as ``options=`` (``Options`` or dict) and/or keywords (``temperature=0.2``).
        ``per_group_errors=True``: a bad group gets ``GroupResult.error`` instead of
        failing the call. ``request_id``: the X-Request-ID (``<id>.<k>`` when split).
        """
        return self.reweight_response(
            groups, options=options, per_group_errors=per_group_errors, request_id=request_id, **option_kwargs
        ).results

    def reweight_response(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: str | None = None,
        **option_kwargs: Any,
    ) -> ReweightResponse:
        """Like ``reweight`` but the whole envelope (model, version, resolved options,
        usage summed over the requests the batch was split into)."""
        return self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    def upload_image(self, image: Any) -> str:
        """Upload image bytes (or a path / base64 dict) unchanged; returns its sha256."""
        return self._drive(self._core.upload_image_job(image))

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``GET /v1/info`` (cached after the first call): model, limits, defaults ..."""
        return self._drive(self._core.info_job(refresh))

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until ``/readyz`` says ready; raises ServerNotReady after ``timeout`` s."""
        return self._drive(self._core.wait_ready_job(timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
        return self._http.request(call.method, _url(call), content=call.content, headers=call.headers,
                                  timeout=call.timeout)


class AsyncClient(_Base, AsyncDriver):
    """Asynchronous client of the KAWHI service (an async context manager); the same
    methods as ``Client``, as coroutines."""

    def _open(self, config: ClientConfig) -> None:
        self._http = httpx.AsyncClient(
            base_url=config.base_url, headers=dict(config.headers), limits=config.http_limits(),
            verify=config.verify, follow_redirects=False,
        )
        self._slots = asyncio.Semaphore(config.max_in_flight)

    # ------------------------------------------------------------------ API
    async def reweight(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: str | None = None,
        **option_kwargs: Any,
    ) -> list[GroupResult]:
        """See ``Client.reweight``."""
        resp = await self.reweight_response(
            groups, options=options, per_group_errors=per_group_errors, request_id=request_id, **option_kwargs
        )
        return resp.results

    async def reweight_response(
        self,
        groups: Iterable[GroupLike],
        *,
        options: OptionsLike = None,
        per_group_errors: bool = False,
        request_id: str | None = None,
        **option_kwargs: Any,
    ) -> ReweightResponse:
        """See ``Client.reweight_response``."""
        return await self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    async def upload_image(self, image: Any) -> str:
        """See ``Client.upload_image``."""
        return await self._drive(self._core.upload_image_job(image))

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        """See ``Client.info``."""
        return await self._drive(self._core.info_job(refresh))

    async def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """See ``Client.wait_ready``."""
        return await self._drive(self._core.wait_ready_job(timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        return await self._http.request(call.method, _url(call), content=call.content, headers=call.headers,
                                        timeout=call.timeout)
