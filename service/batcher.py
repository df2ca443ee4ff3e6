"""Micro-batching for asyncio: many concurrent `await submit(item)` calls, one batch call.

The batch function is synchronous and CPU-bound (the ONNX encoder); it runs in a worker
thread so the event loop keeps serving requests while a batch is encoded. One batch runs at
a time: on a small CPU, two concurrent batches would only fight over the same cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """The batcher's queue is full; the caller should retry later (HTTP 429)."""


class BatcherClosed(RuntimeError):
    """`submit` was called on a batcher that is closing or closed (HTTP 503)."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Collect concurrent submissions into batches for `fn`.

    fn: takes a list of items and returns a sequence of results of the same length, in the
        same order. It runs in a dedicated worker thread.
    max_batch: most items per call of `fn`.
    max_wait_ms: once the first item of a batch arrives, how long to wait for more.
    max_queue: most items waiting (not yet handed to `fn`); beyond it `submit` raises
        `Overloaded` at once instead of queueing.
    max_delay_ms: most time an item may expect to wait: `submit` raises `Overloaded` at once
        when the items ahead of it, at the rate `fn` has been getting through them (a moving
        average), would take longer. Past capacity this sheds load within milliseconds and
        keeps the latency of what is accepted bounded, where a count alone lets the queue hold
        seconds of work. 0: no such limit.

    Create it inside a running event loop (for example in the app's lifespan); call
    `await close()` at shutdown: it stops accepting work, finishes what is queued, and stops
    the worker thread.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        max_queue: int = 1024,
        max_delay_ms: float = 0.0,
        name: str = "batcher",
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_delay_s = max_delay_ms / 1000.0
        self.name = name
        self.rate: float | None = None  # items per second through fn, moving average
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)
        self.batches = 0  # number of calls of fn so far (for metrics and tests)
        self.last_batch_size = 0

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch being computed)."""
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result; raises what `fn` raised for its batch."""
        if self._closing:
            raise BatcherClosed(f"{self.name} is closed")
        depth = self._queue.qsize()
        if depth >= self.max_queue:
            raise Overloaded(f"{self.name}: {self.max_queue} items already queued; retry later")
        if self.max_delay_s and self.rate and depth / self.rate > self.max_delay_s:  # never with none ahead
            raise Overloaded(
                f"{self.name}: {depth} items queued, about {1000 * depth / self.rate:.0f} ms of work at "
                f"{self.rate:.0f} items/s, over the {1000 * self.max_delay_s:.0f} ms limit; retry later"
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(item, future))
        return await future

    async def close(self) -> None:
        """Stop accepting items, finish the queued ones, then stop the worker thread."""
        if self._closing:
            await asyncio.shield(self._task)
            return
        self._closing = True
        self._queue.put_nowait(_STOP)  # sentinel wakes the loop
        try:
            await self._task
        finally:
            self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    if self._queue.empty():
                        timeout = deadline - loop.time()
                        if timeout <= 0:
                            break
                        nxt = await asyncio.wait_for(self._queue.get(), timeout)
                    else:
                        nxt = self._queue.get_nowait()
                except TimeoutError:
                    break
                if nxt is _STOP:
                    stop = True  # finish this batch, and what is still queued, then leave
                    break
                batch.append(nxt)
            await self._dispatch(loop, batch)
        # Drain: after close(), items queued before the sentinel are still served.
        rest: list[_Pending[T, R]] = []
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if p is not _STOP:
                rest.append(p)
        for start in range(0, len(rest), self.max_batch):
            await self._dispatch(loop, rest[start : start + self.max_batch])

    async def _dispatch(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]
    ) -> None:
        live = [p for p in batch if not p.future.cancelled()]
        if not live:
            return
        self.batches += 1
        self.last_batch_size = len(live)
        items = [p.item for p in live]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._fn, items)
            rate = len(items) / max(time.perf_counter() - started, 1e-6)
            self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self.name}: batch function returned {len(results)} results "
                    f"for {len(items)} items"
                )
        except Exception as exc:  # handed to every caller of this batch
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, r in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)


_STOP: _Pending[Any, Any] = object()  # type: ignore[assignment]  # a sentinel, never a real item


__all__ = ["BatcherClosed", "MicroBatcher", "Overloaded"]
