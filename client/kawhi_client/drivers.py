"""The two drivers of the sans-I/O jobs (``kawhi_client.core``): ``SyncDriver`` runs them
with threads and ``time.sleep``, ``AsyncDriver`` with tasks and ``asyncio.sleep``. A
client mixes one in and says only how a ``Call`` is sent (``_send``: httpx over HTTP, the
stub call it stands for over gRPC)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kawhi_client.actions import Call, Job, Lookup, Sleep, check_action, resume
from kawhi_client.core import Core


def addresses(infos: Iterable[Any]) -> list[str]:
    """getaddrinfo's answer -> the distinct IP addresses, sorted."""
    return sorted({info[4][0] for info in infos})


class SyncDriver:
    """Runs jobs in the calling thread; ``Parallel`` jobs on a pool, each holding one of the
    ``max_in_flight`` slots for its whole life."""

    _core: Core
    _slots: threading.BoundedSemaphore

    def _send(self, call: Call) -> Any:
        raise NotImplementedError

    def _drive(self, job: Job, in_slot: bool = False) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            done, action = resume(job, value, error)
            if done:
                return action
            check_action(action)
            value, error = None, None
            try:
                if isinstance(action, Call):
                    value = self._send(action)
                elif isinstance(action, Lookup):
                    value = addresses(socket.getaddrinfo(action.host, action.port, type=socket.SOCK_STREAM))
                elif isinstance(action, Sleep):
                    time.sleep(action.seconds)
                elif in_slot:  # already holding a slot: one after another in it
                    value = [self._drive(j, True) for j in action.jobs]
                elif len(action.jobs) == 1:
                    value = [self._in_slot(action.jobs[0])]
                else:
                    value = self._parallel(action.jobs)
            except Exception as exc:  # handed to the job, which decides
                error = exc

    def _in_slot(self, job: Job) -> Any:
        with self._slots:
            return self._drive(job, True)

    def _parallel(self, jobs: list[Job]) -> list[Any]:
        pool = ThreadPoolExecutor(max_workers=min(len(jobs), self._core.max_in_flight),
                                  thread_name_prefix="kawhi-client")
        try:
            futures = [pool.submit(self._in_slot, j) for j in jobs]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class AsyncDriver:
    """Runs jobs as coroutines; ``Parallel`` jobs as tasks, each holding one of the
    ``max_in_flight`` slots for its whole life."""

    _core: Core
    _slots: asyncio.Semaphore

    async def _send(self, call: Call) -> Any:
        raise NotImplementedError

    async def _drive(self, job: Job, in_slot: bool = False) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            done, action = resume(job, value, error)
            if done:
                return action
            check_action(action)
            value, error = None, None
            try:
                if isinstance(action, Call):
                    value = await self._send(action)
                elif isinstance(action, Lookup):
                    infos = await asyncio.get_running_loop().getaddrinfo(action.host, action.port,
                                                                         type=socket.SOCK_STREAM)
                    value = addresses(infos)
                elif isinstance(action, Sleep):
                    await asyncio.sleep(action.seconds)
                elif in_slot:
                    value = [await self._drive(j, True) for j in action.jobs]
                else:
                    value = await self._parallel(action.jobs)
            except Exception as exc:  # handed to the job, which decides
                error = exc

    async def _in_slot(self, job: Job) -> Any:
        async with self._slots:
            return await self._drive(job, True)

    async def _parallel(self, jobs: list[Job]) -> list[Any]:
        tasks = [asyncio.ensure_future(self._in_slot(j)) for j in jobs]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
