"""``GrpcClient``: the KAWHI service over gRPC (kawhi.v1.Kawhi), with ``Client``'s methods,
results, retry policy, replicas and failover (``AsyncGrpcClient``, in
``kawhi_client.grpc.aio``, is the asyncio twin).

    from kawhi_client import GrpcClient
    with GrpcClient("kawhi:50051") as kawhi:
        results = kawhi.reweight(groups)           # list[GroupResult], input order

Everything but the sending is ``Client``'s own, the one sans-I/O core
(``kawhi_client.core``): local checks, images uploaded once and sent by hash, packing
under the server's limits, waiting for readiness (grpc.health.v1), the retry policy,
replicas by rendezvous hashing on the routing key with failover (a hung replica included:
``failover_timeout``), an evicted image uploaded again, a request over a size limit
(RESOURCE_EXHAUSTED without RetryInfo, the 413 of gRPC) split in two, pointers
rewritten to the caller's list. ``kawhi_client.grpc.transport`` maps each call to its RPC
and each status to the HTTP status of the same problem; ``kawhi_client.grpc.dialect``
builds the request messages and decodes the answers straight to the client's models.

``reweight_stream`` sends groups one per message on ``ReweightStream`` and yields
``(index, GroupResult)`` as each finishes (any order). A stream is not retried.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from kawhi_client.actions import Call, Job
from kawhi_client.config import (
    DEFAULT_FAILOVER_TIMEOUT_S,
    ClientConfig,
    RetryPolicy,
    Timeouts,
    ready_timeout,
    retry_policy,
    unreachable_grace,
)
from kawhi_client.core import Core, CoreViews
from kawhi_client.drivers import SyncDriver
from kawhi_client.grpc import convert, transport
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc._proto import kawhi_pb2_grpc as pb_grpc
from kawhi_client.grpc.dialect import GrpcDialect
from kawhi_client.planning import (
    GroupLike,
    OptionsLike,
    PreparedGroup,
    new_request_id,
    options_json,
    prepare_groups,
    remap_problem,
)
from kawhi_client.replicas import ReplicaSet
from kawhi_client.routing import GRPC_METADATA_KEY, request_routing_key
from kawhi_client.schema import GroupResult, ReweightResponse

DEFAULT_TARGET = "127.0.0.1:50051"
SERVICE = transport.SERVICE


class _GrpcBase(CoreViews):
    """What ``GrpcClient`` and ``AsyncGrpcClient`` share: the constructor and the read-only views.

    Args:
        target: ``host:port`` of the gRPC front end (default ``$KAWHI_GRPC_TARGET`` or
            ``127.0.0.1:50051``).
        api_key: bearer key, sent as ``authorization`` metadata (default ``$KAWHI_API_KEY``).
        credentials: ``grpc.ChannelCredentials`` for TLS (default: plaintext).
        timeout, timeout_per_token, connect_timeout, max_in_flight, retries, backoff,
        wait_ready, max_groups_per_request, shared_image_cache, resolve_every: as ``Client``
            (the deadline of a call is ``timeout + timeout_per_token * estimated tokens``).
        replicas: several replicas instead of one ``target``: a list of ``host:port`` (or one
            comma-separated string), or ``dns+grpc://NAME:PORT`` for a headless Service.
            Each group goes to the replica rendezvous hashing on its routing key picks (the
            same key as over HTTP), with failover, as ``Client(replicas=...)``.
        failover_timeout: as ``Client``: with several replicas, the deadline of an attempt
            another healthy replica could take over; a replica that misses it is skipped
            for 30 s (``stats.replica_timeouts``). None: the full deadline.
        metadata: extra metadata on every call.
        options: extra channel options.
        token_arrays: as ``Client``: False leaves the per-token advantages and weights out of
            the answers (the paragraphs carry them), halving what a call brings back.
    """

    _core: Core

    def __init__(
        self,
        target: str | None = None,
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
        metadata: Sequence[tuple[str, str]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        rng: Any = None,
        token_arrays: bool = True,
        replicas: str | Sequence[str] | None = None,
        resolve_every: float = 30.0,
        shared_image_cache: bool = False,
        failover_timeout: float | None = DEFAULT_FAILOVER_TIMEOUT_S,
    ) -> None:
        spec: Any = None
        if replicas is not None:
            items = replicas.split(",") if isinstance(replicas, str) else list(replicas)
            spec = [transport.replica_url(r) for r in items if r.strip()]
            if len(spec) == 1 and spec[0].startswith("dns+"):
                spec = spec[0]
            probe = ReplicaSet(spec, resolve_every=resolve_every, schemes=GrpcDialect.replica_schemes)
            if target is None:
                target = transport.target_of(probe.urls[0], "") if probe.urls else f"{probe.dns.host}:{probe.dns.port}"  # type: ignore[union-attr]
        self.target = target or os.environ.get("KAWHI_GRPC_TARGET") or DEFAULT_TARGET
        key = api_key if api_key is not None else os.environ.get("KAWHI_API_KEY")
        self._metadata = list(metadata or ())
        if key:
            self._metadata.append(("authorization", f"Bearer {key}"))
        config = ClientConfig(
            base_url=self.target,
            headers={},
            timeouts=Timeouts(base=timeout, per_token=timeout_per_token, connect=connect_timeout,
                              failover=failover_timeout),
            retry=retry_policy(retries, backoff),
            max_in_flight=max_in_flight,
            ready_timeout=ready_timeout(wait_ready),
            unreachable_grace=unreachable_grace(wait_ready),
            max_groups_per_request=max_groups_per_request,
            replicas=spec,
            resolve_every=resolve_every,
            shared_image_cache=shared_image_cache,
        )
        self._core = Core(config, rng=rng, dialect=GrpcDialect(token_arrays))
        self._credentials = credentials
        # the server enforces the message limits (the same as over HTTP); the client does not add its own.
        # grpc's connect timeout (20 s unless set) is connect_timeout, as Client's: a replica that
        # accepts TCP but never answers the HTTP/2 handshake is given up on after it.
        self._channel_options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
                                 ("grpc.primary_user_agent", "kawhi-client"),
                                 ("grpc.min_reconnect_backoff_ms", max(1, int(connect_timeout * 1000))),
                                 *(options or ())]
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    @property
    def token_arrays(self) -> bool:
        return self._core.dialect.token_arrays  # type: ignore[attr-defined]

    @property
    def replicas(self) -> tuple[str, ...]:
        """The replicas' targets (``host:port``; several replicas), or ``(target,)``."""
        rs = self._core.replicas
        return tuple(transport.target_of(u, "") for u in rs.urls) if rs is not None else (self.target,)

    def _stream_plan(self, groups: Iterable[GroupLike], options: OptionsLike, option_kwargs: dict[str, Any],
                     request_id: str | None) -> Job:
        """The stream's preparation, as a job: info, the groups' messages, the replica of its
        first group's key and the images uploaded there. Returns (failed results, groups to
        send, their requests, replica, request id)."""
        core = self._core
        groups = list(groups)
        opts = options_json(options, option_kwargs)
        prepared, failed, images = prepare_groups(groups, True)
        yield from core.info_job()
        encoded = core.dialect.encode_groups(prepared, failed, True)
        todo: list[PreparedGroup] = [g for g in prepared if g is not None and g.index in encoded]
        rid = request_id or new_request_id()
        route = request_routing_key([g.route for g in todo])
        endpoint = (yield from core.choose_replica(route or rid, set())) if core.replicas is not None else None
        yield from core.uploads_job({endpoint: todo}, images, route=route)
        requests = [core.dialect.content([encoded[g.index]], opts, True) for g in todo]
        return failed, todo, requests, endpoint, rid

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, max_in_flight={self._core.max_in_flight})"


def _stream_result(todo: list[PreparedGroup], item: pb.ReweightStreamResult) -> tuple[int, GroupResult]:
    g = todo[item.request_index]
    result = convert.group_result_from_message(item.result)
    if result.error is not None:
        result.error = remap_problem(result.error, [g.index])
    return g.index, result


class GrpcClient(_GrpcBase, SyncDriver):
    """Synchronous gRPC client of the KAWHI service (thread-safe; a context manager).
    The arguments are ``_GrpcBase``'s."""

    def _open(self) -> None:
        self._channels: dict[str, tuple[grpc.Channel, Any, Any]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._core.max_in_flight)

    def _stubs(self, endpoint: str | None) -> tuple[Any, Any]:
        """(kawhi stub, health stub) of a replica's channel (made on first use)."""
        target = transport.target_of(endpoint, self.target)
        with self._lock:
            if target not in self._channels:
                channel = (grpc.secure_channel(target, self._credentials, options=self._channel_options)
                           if self._credentials is not None
                           else grpc.insecure_channel(target, options=self._channel_options))
                self._channels[target] = (channel, pb_grpc.KawhiStub(channel), health_pb2_grpc.HealthStub(channel))
            _, stub, health = self._channels[target]
        return stub, health

    def _send(self, call: Call) -> transport.GrpcReply:
        rpc = transport.rpc_of(call)
        stub, health = self._stubs(call.endpoint)
        meta, deadline = transport.metadata(call, self._metadata), transport.deadline(call)
        try:
            if rpc == "ready":
                if transport.serving(health.Check(transport.health_request(), timeout=deadline, metadata=meta)):
                    return transport.ready_reply()
                try:
                    stub.Info(pb.InfoRequest(), timeout=deadline, metadata=meta)
                except grpc.RpcError as exc:
                    return transport.not_serving_reply(exc)
                return transport.not_serving_reply(None)
            if rpc == "info":
                return transport.info_reply(stub.Info(pb.InfoRequest(), timeout=deadline, metadata=meta))
            if rpc == "image":
                return transport.image_reply(stub.PutImage(transport.image_chunks(call.content), timeout=deadline,
                                                           metadata=meta))
            return transport.GrpcReply(200, message=stub.Reweight(call.content, timeout=deadline, metadata=meta))
        except grpc.RpcError as exc:
            return transport.reply_of_error(exc, rpc, transport.target_of(call.endpoint, self.target))

    # ------------------------------------------------------------------ API
    def reweight(self, groups: Iterable[GroupLike], *, options: OptionsLike = None, per_group_errors: bool = False,
                 request_id: str | None = None, **option_kwargs: Any) -> list[GroupResult]:
        """As ``Client.reweight``: one ``GroupResult`` per group, in input order."""
        return self.reweight_response(groups, options=options, per_group_errors=per_group_errors,
                                      request_id=request_id, **option_kwargs).results

    def reweight_response(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                          per_group_errors: bool = False, request_id: str | None = None,
                          **option_kwargs: Any) -> ReweightResponse:
        """As ``Client.reweight_response``: the whole envelope, usage summed over the calls."""
        return self._drive(self._core.reweight_job(groups, options, option_kwargs, per_group_errors, request_id))

    def reweight_stream(self, groups: Iterable[GroupLike], *, options: OptionsLike = None,
                        request_id: str | None = None, **option_kwargs: Any) -> Iterator[tuple[int, GroupResult]]:
        """Send the groups on one ``ReweightStream`` (one per message) and yield ``(index,
        result)`` as each finishes. A bad group is a result with ``error`` (always per-group
        errors), its pointer indexing the caller's list."""
        failed, todo, requests, endpoint, rid = self._drive(self._stream_plan(groups, options, option_kwargs,
                                                                              request_id))
        yield from failed.items()
        stub, _ = self._stubs(endpoint)
        timeout = self._core.timeouts.read_timeout(sum(g.tokens for g in todo))
        meta = [*self._metadata, ("x-request-id", rid)]
        route = request_routing_key([g.route for g in todo])
        if route:
            meta.append((GRPC_METADATA_KEY, route))
        call = stub.ReweightStream(iter(requests), timeout=timeout, metadata=meta)
        try:
            for item in call:
                yield _stream_result(todo, item)
        except grpc.RpcError as exc:
            raise transport.error_of(exc, "ReweightStream", transport.target_of(endpoint, self.target), rid) from None
        finally:
            call.cancel()  # a caller that stopped reading: the server drops what is queued

    def upload_image(self, image: Any) -> str:
        """Upload image bytes (or a path / base64 dict) unchanged; returns its sha256."""
        return self._drive(self._core.upload_image_job(image))

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """``Info`` (cached after the first call): model, limits, defaults ... as ``Client.info``."""
        return self._drive(self._core.info_job(refresh))

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until grpc.health.v1 says SERVING; raises ServerNotReady after ``timeout`` s
        (at once if the model failed to load)."""
        return self._drive(self._core.wait_ready_job(timeout))

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel, _, _ in channels:
            channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
