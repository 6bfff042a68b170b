"""What a client job asks its driver to do (see ``kawhi_client.core``): send an HTTP
request, resolve a name, sleep, or run jobs concurrently; and the two helpers that
advance a job. Both drivers (``Client``, ``AsyncClient``) and the tests' fake drivers
answer exactly these."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Call:
    """Send one HTTP request; the driver answers the httpx.Response (body read) or
    throws the httpx exception into the job."""

    method: str
    path: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    content: bytes | None = None
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
