"""What a client job asks its driver to do (see ``kawhi_client.core``): send a request,
resolve a name, sleep, or run jobs concurrently; and the two helpers that advance a job.
The drivers (``Client``, ``AsyncClient``, ``GrpcClient``, ``AsyncGrpcClient``) and the
tests' fake drivers answer exactly these.

The jobs speak HTTP's vocabulary: a ``Call`` names a method and path, its answer has a
status code, headers and a body, and a failed exchange is an httpx exception. The gRPC
drivers translate (``kawhi_client.grpc.transport``): each call to the RPC it stands for,
each status to the HTTP status of the same problem, and a transport failure to the httpx
exception of the same kind."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Call:
    """Send one request; the driver answers the httpx.Response (body read; the gRPC
    drivers an object with the same ``status_code``, ``headers``, ``content``) or throws
    the httpx exception into the job. ``content``: the body (bytes), or what the dialect
    built (a protobuf message over gRPC)."""

    method: str
    path: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    content: Any = None
    endpoint: str | None = None  # a replica's base URL; None: the client's base_url


@dataclass
class Lookup:
    """Resolve a host name; the driver answers its addresses (a list of IP strings) or
    throws the OSError into the job."""

    host: str
    port: int


@dataclass
class Sleep:
    seconds: float


@dataclass
class Parallel:
    """Run these jobs concurrently, each holding one of the ``max_in_flight`` slots for
    its whole life (retries and waits included); answers their results in order. Inside
    a job (already holding a slot) the jobs run one after another in that slot."""

    jobs: list[Generator[Any, Any, Any]]


Job = Generator[Any, Any, Any]

# The failures a driver throws into a job that are worth another attempt: the network, a
# dropped connection, a timeout.
RETRY_EXCEPTIONS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def resume(job: Job, value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Advance a job: (True, its return value) when it is done, else (False, next action)."""
    try:
        action = job.throw(error) if error is not None else job.send(value)
    except StopIteration as stop:
        return True, stop.value
    return False, action


def check_action(action: Any) -> None:
    if not isinstance(action, (Call, Lookup, Sleep, Parallel)):
        raise TypeError(f"kawhi_client: a job yielded {action!r}")
