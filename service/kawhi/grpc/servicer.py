"""kawhi.v1.Kawhi: Reweight, ReweightStream, PutImage, Info: gRPC framing over the serving core.

The servicer turns messages into the pipeline's parsed request (kawhi.grpc.messages:
image bytes stay bytes, no JSON on the way) and hands it to the same
``ReweightService`` as HTTP (admission, idempotency, queue, deadline, drain, image
store); the answer is encoded straight from the model into protobuf
(``ProtobufCodec``), and stored that way for an idempotent retry. Every call goes
through ``_Rpc``: the bearer key from the ``authorization`` metadata
(compared in constant time, as over HTTP), the request id (``x-request-id``), the
in-flight count a drain waits for, the metrics (``frontend="grpc"``), and the error
mapping — a ``KawhiError`` becomes the rich status of
``kawhi_client.grpc.status.status_for``; anything unexpected is logged and answered
INTERNAL with no detail of it. A cancelled call (the client went away or its deadline
passed) cancels the pipeline's await, which drops its queued groups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc._cython import cygrpc  # grpc.aio's transport errors: no public name for this one
from grpc_status import rpc_status
from kawhi_client.grpc import convert
from kawhi_client.grpc._proto import kawhi_pb2 as pb
from kawhi_client.grpc._proto import kawhi_pb2_grpc as pb_grpc
from kawhi_client.grpc.status import status_for
from kawhi_client.routing import GRPC_METADATA_KEY
from kawhi_client.schema import GroupResult, Problem

from kawhi.errors import KawhiError
from kawhi.grpc.messages import PROTOBUF, Undecodable, parse_group_message, parse_request_message
from kawhi.logs import accept_request_id, request_id_var
from kawhi.pipeline.admit import check_request_size
from kawhi.pipeline.auth import bearer_token, key_is_valid, unauthorized
from kawhi.pipeline.service import ReweightService

# A server-side write fails with this only once the call is over (cancelled, past its
# deadline): the transport can say so before context.cancelled() turns true, and then the
# cancelled stream was logged as an unhandled error (a flaky failure under load).
_CALL_OVER = (cygrpc.ExecuteBatchError,)

log = logging.getLogger("kawhi.server.grpc")

SERVICE = "kawhi.v1.Kawhi"


def _metadata(context: grpc.aio.ServicerContext, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def _retry_after(err: KawhiError) -> float | None:
    value = err.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Rpc:
    """One call: auth, request id, in-flight count, metrics, error mapping (see the module doc)."""

    def __init__(self, state: ReweightService, context: grpc.aio.ServicerContext, method: str) -> None:
        self.state, self.context, self.route = state, context, f"/{SERVICE}/{method}"
        self.code = grpc.StatusCode.OK

    async def __aenter__(self) -> _Rpc:
        self.rid = accept_request_id(_metadata(self.context, "x-request-id"))
        self.token = request_id_var.set(self.rid)
        self.started = time.perf_counter()
        self.state.metrics.in_flight.inc()
        self.state.enter()
        self.context.set_trailing_metadata((("x-request-id", self.rid),))
        keys = self.state.api_keys
        if keys:
            if not key_is_valid(bearer_token(_metadata(self.context, "authorization")), keys):
                err = unauthorized()
                await self.__aexit__(type(err), err, None)  # counts, cleans up and aborts (raises)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc is None:
                return False
            if isinstance(exc, KawhiError):
                await self._abort(exc)
            elif isinstance(exc, asyncio.CancelledError):
                self.code = grpc.StatusCode.CANCELLED
            elif isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
                log.error("unhandled error", exc_info=(exc_type, exc, tb))
                await self._abort(KawhiError("internal", "an unexpected error occurred; it has been logged"))
            return False
        finally:
            self.state.leave()
            self.state.metrics.in_flight.dec()
            labels = ("grpc", self.route, self.code.name)
            self.state.metrics.requests.labels(*labels).inc()
            self.state.metrics.request_duration.labels(*labels).observe(time.perf_counter() - self.started)
            try:
                request_id_var.reset(self.token)
            except ValueError:  # wound up in another task's Context (a closed stream's): nothing to restore
                pass

    async def _abort(self, err: KawhiError) -> None:
        self.state.count_error(err)
        problem = Problem.model_validate({**err.to_problem(), "request_id": self.rid})
        code = getattr(grpc.StatusCode, err.grpc_code)  # the catalogue's code for this kind
        status = rpc_status.to_status(status_for(problem, _retry_after(err), code))
        self.code = status.code
        metadata = tuple(status.trailing_metadata) + (("x-request-id", self.rid),)
        await self.context.abort(status.code, status.details, metadata)


def _into_message(problem: Any, j: int) -> Any:
    """A one-group request's problem (``/groups/0/...``) pointed at the group's place ``j`` in
    the stream message it came in."""
    def move(ptr: str | None) -> str | None:
        if ptr and (ptr == "/groups/0" or ptr.startswith("/groups/0/")):
            return f"/groups/{j}" + ptr[len("/groups/0"):]
        return ptr

    data = problem.model_dump()
    data["pointer"] = move(problem.pointer)
    if isinstance(data.get("errors"), list):
        data["errors"] = [{**e, "pointer": move(e.get("pointer"))} if isinstance(e, dict) else e for e in data["errors"]]
    return type(problem).model_validate(data)


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)


class KawhiServicer(pb_grpc.KawhiServicer):
    def __init__(self, state: ReweightService) -> None:
        self.state = state

    async def Reweight(self, request: pb.ReweightRequest, context: grpc.aio.ServicerContext) -> bytes:
        """The answer as the serialised message (kawhi.grpc.server sends bytes as they are)."""
        async with _Rpc(self.state, context, "Reweight"):
            if isinstance(request, Undecodable):
                raise request.error()
            self.state.metrics.observe_routing_key(_metadata(context, GRPC_METADATA_KEY) or None)
            service = self.state
            service.require_engine()  # loading / draining
            deadline = service.deadline(_timeout(context))
            admission = await service.admit_parsed(lambda: parse_request_message(request), len(request.groups))
            answer = await service.reweight(admission, deadline, PROTOBUF)
            return answer.payload

    async def ReweightStream(
        self, requests: AsyncIterator[pb.ReweightRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Results are written with ``context.write``, not yielded: a call cancelled while a write
        waits on flow control cancels this coroutine there, so the cleanup below runs at once (a
        generator left at its ``yield`` would be closed by asyncio's finalizer, late and in
        another Context)."""
        async with _Rpc(self.state, context, "ReweightStream"):
            self.state.require_engine()  # loading / draining: the whole stream is refused
            self.state.metrics.observe_routing_key(_metadata(context, GRPC_METADATA_KEY) or None)
            done: asyncio.Queue = asyncio.Queue()
            tasks: set[asyncio.Task] = set()
            # Backpressure: a group takes a place before it is read on and gives it back once its
            # result is sent; a client that does not read its results stops the reading, and the
            # HTTP/2 flow control then stops its sending.
            window = asyncio.Semaphore(self.state.settings.stream_window_groups)
            reading = asyncio.ensure_future(self._read_stream(requests, context, done, tasks, window))
            try:
                pending_reader = True
                while pending_reader or tasks or not done.empty():
                    item = await done.get()
                    if item is None:  # the client closed its side; results of what it sent still come
                        pending_reader = False
                        continue
                    if isinstance(item, BaseException):
                        raise item
                    try:
                        await context.write(item)
                    except Exception as exc:
                        if context.cancelled() or context.done() or isinstance(exc, _CALL_OVER):
                            raise asyncio.CancelledError() from None  # the caller went away during the write
                        raise
                    window.release()
            finally:
                reading.cancel()
                for t in list(tasks):
                    t.cancel()  # the client went away: drop its queued groups

    async def _read_stream(
        self, requests: AsyncIterator[pb.ReweightRequest], context: grpc.aio.ServicerContext,
        done: asyncio.Queue, tasks: set[asyncio.Task], window: asyncio.Semaphore,
    ) -> None:
        try:
            k = 0
            async for message in requests:
                if isinstance(message, Undecodable):
                    raise message.error()  # the stream's framing is lost: the call ends INVALID_ARGUMENT
                check_request_size(len(message.groups), self.state.limits)  # the unary limit, per message
                options = message.options if message.HasField("options") else None
                arrays = message.token_arrays if message.HasField("token_arrays") else True
                for j, group in enumerate(message.groups):
                    await window.acquire()
                    task = asyncio.ensure_future(self._one_group(k, j, group, options, arrays, context, done))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                k += 1
            done.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken inbound stream ends the call (a KawhiError: its status)
            done.put_nowait(exc)

    async def _one_group(
        self, k: int, j: int, group: pb.RolloutGroup, options: pb.Options | None, token_arrays: bool,
        context: grpc.aio.ServicerContext, done: asyncio.Queue,
    ) -> None:
        """One group of a stream through the pipeline as a one-group request; any problem
        becomes that group's error, pointing into its message (``/groups/j/...``). Always puts
        one message on ``done`` (the stream waits for it), whatever fails."""
        try:
            msg = await self._group_result(k, j, group, options, token_arrays, context)
        except asyncio.CancelledError:
            raise
        except Exception:  # converting the group or its answer failed: a bug of ours, this group only
            log.exception("stream group failed")
            err = KawhiError("internal", "this group failed unexpectedly; it has been logged", f"/groups/{j}")
            result = GroupResult(id=group.id if group.HasField("id") else None,
                                 error=Problem.model_validate(err.to_problem()))
            msg = pb.ReweightStreamResult(result=convert.group_result_to_message(result), request_index=k,
                                          group_index=j)
        done.put_nowait(msg)

    async def _group_result(
        self, k: int, j: int, group: pb.RolloutGroup, options: pb.Options | None, token_arrays: bool,
        context: grpc.aio.ServicerContext,
    ) -> pb.ReweightStreamResult:
        service = self.state
        try:
            service.require_engine()
            deadline = service.deadline(_timeout(context))
            admission = await service.admit_parsed(lambda: parse_group_message(group, options, token_arrays), 1)
            answer = await service.reweight(admission, deadline, PROTOBUF)
        except KawhiError as err:
            service.count_error(err)
            gid = group.id if group.HasField("id") else None
            error = _into_message(Problem.model_validate(err.to_problem()), j)
            return pb.ReweightStreamResult(result=convert.group_result_to_message(GroupResult(id=gid, error=error)),
                                           request_index=k, group_index=j, usage=pb.Usage())
        message = pb.ReweightResponse.FromString(answer.payload)
        result = message.results[0]
        if result.HasField("error"):
            fixed = _into_message(convert.problem_from_message(result.error), j)
            result = pb.GroupResult()
            result.CopyFrom(message.results[0])
            result.error.CopyFrom(convert.problem_to_message(fixed))
        return pb.ReweightStreamResult(result=result, request_index=k, group_index=j, model=message.model,
                                       version=message.version, usage=message.usage)

    async def PutImage(self, chunks: AsyncIterator[pb.ImageChunk], context: grpc.aio.ServicerContext) -> pb.ImageInfo:
        async with _Rpc(self.state, context, "PutImage"):
            if self.state.draining:
                self.state.require_engine()
            timeout = self.state.settings.body_timeout_s
            try:  # a stalled upload is cut as a stalled HTTP body is (408 there)
                data = await asyncio.wait_for(self._upload(chunks), timeout=timeout)
            except asyncio.TimeoutError:
                raise KawhiError("request-timeout", f"the upload did not arrive within {timeout:g} s") from None
            stored = await self.state.store_image(data)
            return pb.ImageInfo(**stored.to_dict())

    async def _upload(self, chunks: AsyncIterator[pb.ImageChunk]) -> bytes:
        limit = self.state.settings.max_image_bytes
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            if isinstance(chunk, Undecodable):
                raise chunk.error()
            size += len(chunk.data)
            if size > limit:  # stop reading: never hold more than the limit
                raise KawhiError("too-large", f"the image is over the limit of {limit} bytes")
            parts.append(chunk.data)
        return b"".join(parts)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> Any:
        async with _Rpc(self.state, context, "Info"):
            if isinstance(request, Undecodable):
                raise request.error()
            return convert.to_struct(self.state.info().to_dict())
