"""MicroBatcher: coalescing, order, errors, back-pressure, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batcher import BatcherClosed, MicroBatcher, Overloaded


def test_concurrent_submits_are_coalesced_and_ordered() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.01)  # a batch takes time, as an encoder call does
        return [i * i for i in items]

    async def main() -> list[int]:
        b: MicroBatcher[int, int] = MicroBatcher(
            square, max_batch=16, max_wait_ms=20, max_queue=100
        )
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(40)))
        finally:
            await b.close()

    results = asyncio.run(main())
    assert results == [i * i for i in range(40)]
    assert len(calls) < 40 // 2, f"40 submits should need few batches, got {len(calls)}"
    assert max(len(c) for c in calls) <= 16
    assert sorted(i for c in calls for i in c) == list(range(40))


def test_batch_function_runs_off_the_event_loop() -> None:
    loop_thread: list[int] = []
    fn_thread: list[int] = []

    def record(items: list[int]) -> list[int]:
        fn_thread.append(threading.get_ident())
        return items

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        b: MicroBatcher[int, int] = MicroBatcher(record, max_batch=4, max_wait_ms=1, max_queue=10)
        assert await b.submit(7) == 7
        await b.close()

    asyncio.run(main())
    assert fn_thread and fn_thread[0] != loop_thread[0]


def test_exceptions_reach_every_caller_of_the_batch() -> None:
    def fail(items: list[int]) -> list[int]:
        raise ValueError(f"bad batch of {len(items)}")

    async def main() -> list[BaseException | int]:
        b: MicroBatcher[int, int] = MicroBatcher(fail, max_batch=8, max_wait_ms=20, max_queue=10)
        try:
            return await asyncio.gather(*(b.submit(i) for i in range(5)), return_exceptions=True)
        finally:
            await b.close()

    results = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results), results


def test_wrong_result_count_is_an_error() -> None:
    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(lambda items: [], max_batch=2, max_wait_ms=1,
                                                 max_queue=4)
        with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
            await b.submit(1)
        await b.close()

    asyncio.run(main())


def test_overloaded_when_queue_is_full() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=3)
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # item 0 is now inside `slow`, the queue is empty
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        assert b.queue_depth == 3
        with pytest.raises(Overloaded):
            await b.submit(4)
        release.set()
        assert await first == 0
        assert await asyncio.gather(*waiting) == [1, 2, 3]
        assert b.queue_depth == 0
        await b.close()

    asyncio.run(main())


def test_close_drains_queued_items_then_refuses() -> None:
    def double(items: list[int]) -> list[int]:
        time.sleep(0.01)
        return [2 * i for i in items]

    async def main() -> None:
        b: MicroBatcher[int, int] = MicroBatcher(double, max_batch=2, max_wait_ms=50, max_queue=50)
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(9)]
        await asyncio.sleep(0)
        await b.close()
        assert [p.result() for p in pending] == [2 * i for i in range(9)]
        with pytest.raises(BatcherClosed):
            await b.submit(1)

    asyncio.run(main())


def test_max_wait_bounds_the_latency_of_a_lone_item() -> None:
    async def main() -> float:
        b: MicroBatcher[int, int] = MicroBatcher(lambda items: items, max_batch=64,
                                                 max_wait_ms=20, max_queue=10)
        t0 = time.perf_counter()
        await b.submit(1)
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    # Not a timing benchmark: only that a lone item is not held for a full batch.
    assert asyncio.run(main()) < 1.0


def test_invalid_arguments() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="max_batch"):
            MicroBatcher(lambda items: items, max_batch=0, max_wait_ms=1, max_queue=1)
        with pytest.raises(ValueError, match="max_queue"):
            MicroBatcher(lambda items: items, max_batch=1, max_wait_ms=1, max_queue=0)

    asyncio.run(main())


def test_overloaded_when_the_queue_holds_more_work_than_the_delay_limit() -> None:
    """10 ms per item, a 50 ms limit: once the rate is known, the 6th item waiting is refused at
    once, while a count limit alone (max_queue 1000) would have queued them all."""

    def slow(items: list[int]) -> list[int]:
        time.sleep(0.01 * len(items))
        return items

    async def main() -> tuple[list[object], float | None]:
        b: MicroBatcher[int, int] = MicroBatcher(slow, max_batch=1, max_wait_ms=0, max_queue=1000,
                                                 max_delay_ms=50, name="t")
        await b.submit(0)  # measures the rate: about 100 items/s
        outcomes = await asyncio.gather(*[b.submit(i) for i in range(30)], return_exceptions=True)
        rate = b.rate
        await b.close()
        return outcomes, rate

    outcomes, rate = asyncio.run(main())
    assert rate is not None and 20 < rate < 200, rate
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, int)]
    assert len(served) + len(refused) == 30
    assert 3 <= len(served) <= 12 and refused, (len(served), len(refused))
    assert "ms limit" in str(refused[0])
