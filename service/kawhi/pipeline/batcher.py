"""Dynamic batching: groups from concurrent requests share one reference forward.

One worker thread owns the engine's forward (``Engine.run``); the event loop never
blocks on it. Requests pass through two gates:

1. *Admission* (``reserve``), on the event loop when the request arrives: the groups
   it brings are counted against ``capacity`` (groups admitted and not yet in a
   forward: being prepared or queued). A request that would exceed it is refused at
   once with ``QueueFull`` (-> 429 + Retry-After); nothing of it is queued.
2. *Batching* (``submit``): prepared groups enter a FIFO; the worker takes the oldest,
   waits at most ``max_wait_s`` for more while the queued tokens are below the
   budget, then packs groups in arrival order while their tokens fit ``batch_tokens``
   and runs them as one forward. Each group has its own asyncio future.

A group larger than the token budget never reaches the queue (the app refuses it
on arrival with 413), so every queued group fits some batch. If a batched forward
raises, its groups are retried one by one so a single bad group cannot fail groups
of other requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kawhi.pipeline.metrics import Metrics

log = logging.getLogger("kawhi.pipeline.batcher")


class QueueFull(Exception):
    def __init__(self, retry_after: int, pending: int, capacity: int) -> None:
        super().__init__(f"{pending} groups pending, capacity {capacity}")
        self.retry_after = retry_after
        self.pending = pending
        self.capacity = capacity


class Ticket:
    """The admission of one request: how many of its groups still hold a queue slot."""

    __slots__ = ("held", "cancelled", "_batcher")

    def __init__(self, batcher: Batcher, n: int) -> None:
        self._batcher = batcher
        self.held = n
        self.cancelled = False

    def release(self, n: int | None = None) -> None:
        """Give back n slots (all remaining by default)."""
        self._batcher._release(self, self.held if n is None else n)

    def cancel(self, reason: str = "error") -> None:
        """The request gave up (``timeout``, ``client-closed``, ``error``): its groups not yet in a
        forward are dropped (counted in ``kawhi_queue_dropped_total{reason}``), their slots freed."""
        if not self.cancelled and self.held:
            self._batcher.metrics.queue_dropped.labels(reason).inc(self.held)
        self.cancelled = True
        self.release()


@dataclass(eq=False)
class _Item:
    prepared: Any
    tokens: int
    ticket: Ticket
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _deliver(it: _Item, setter: Callable[[asyncio.Future, Any], None], value: Any) -> None:
    """Hand a result to the request's event loop; a loop already closed (shutdown past its
    drain deadline) has nobody left to answer."""
    try:
        it.loop.call_soon_threadsafe(setter, it.future, value)
    except RuntimeError:
        pass


class Batcher:
    def __init__(
        self,
        engine: Any,
        metrics: Metrics,
        *,
        batch_tokens: int,
        max_wait_s: float,
        capacity: int,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.thread_init = thread_init
        self.metrics = metrics
        self.batch_tokens = batch_tokens
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._queued_tokens = 0
        self._pending = 0  # admitted groups not yet in a forward
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rate = 0.0  # groups / second, exponentially averaged over forwards

    # ------------------------------------------------------------------ admission
    @property
    def pending(self) -> int:
        return self._pending

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._queue)

    def retry_after(self) -> int:
        """Seconds until the current backlog is likely gone (1..60)."""
        if self._rate <= 0:
            return 1
        return max(1, min(60, math.ceil(self._pending / self._rate)))

    def reserve(self, n: int) -> Ticket:
        with self._cond:
            if self._pending + n > self.capacity:
                raise QueueFull(self.retry_after(), self._pending, self.capacity)
            self._pending += n
            self.metrics.queue_depth.set(self._pending)
        return Ticket(self, n)

    def _release(self, ticket: Ticket, n: int) -> None:
        with self._cond:
            n = min(n, ticket.held)
            if n <= 0:
                return
            ticket.held -= n
            self._pending -= n
            self.metrics.queue_depth.set(self._pending)

    # ------------------------------------------------------------------ submit
    def submit(self, ticket: Ticket, prepared: Sequence[Any]) -> list[asyncio.Future]:
        """Queue prepared groups (must be called on the event loop); one future per group."""
        loop = asyncio.get_running_loop()
        items = [
            _Item(p, int(p.num_tokens), ticket, loop.create_future(), loop)
            for p in prepared
        ]
        with self._cond:
            if self._stopping:
                raise RuntimeError("batcher stopped")
            for it in items:
                self._queue.append(it)
                self._queued_tokens += it.tokens
            self._cond.notify()
        return [it.future for it in items]

    # ------------------------------------------------------------------ worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="kawhi-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take_batch(self) -> list[_Item]:
        """Called with the lock held; waits for work, returns the next batch ([] = stop)."""
        while not self._queue:
            if self._stopping:
                return []
            self._cond.wait()
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._queued_tokens < self.batch_tokens and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch: list[_Item] = []
        tokens = 0
        while self._queue:
            it = self._queue[0]
            if it.ticket.cancelled:
                self._queue.popleft()
                self._queued_tokens -= it.tokens
                continue
            if batch and tokens + it.tokens > self.batch_tokens:
                break
            self._queue.popleft()
            self._queued_tokens -= it.tokens
            batch.append(it)
            tokens += it.tokens
        return batch

    def _worker(self) -> None:
        if self.thread_init is not None:
            self.thread_init()
        while True:
            with self._cond:
                batch = self._take_batch()
                if not batch and self._stopping and not self._queue:
                    return
                self._busy = bool(batch)
            if not batch:
                continue
            for it in batch:
                it.ticket.release(1)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._busy = False

    def _run(self, batch: list[_Item]) -> None:
        tokens = sum(it.tokens for it in batch)
        t0 = time.perf_counter()
        try:
            results = self.engine.run([it.prepared for it in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} groups")
        except Exception as exc:
            if len(batch) == 1:
                it = batch[0]
                _deliver(it, _set_exception, exc)
                return
            log.warning(
                "batched forward failed; retrying its groups one by one",
                extra={"error": f"{type(exc).__name__}: {exc}", "groups": len(batch)},
            )
            for it in batch:
                self._run([it])
            return
        dt = time.perf_counter() - t0
        self.metrics.forward_seconds.observe(dt)
        self.metrics.batch_groups.observe(len(batch))
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.groups.inc(len(batch))
        rate = len(batch) / max(dt, 1e-6)
        self._rate = rate if self._rate <= 0 else 0.8 * self._rate + 0.2 * rate
        for it, res in zip(batch, results):
            _deliver(it, _set_result, res)
