"""The coalescer's bounded line: slots, waiting in turn, and what happens to a waiter that leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.coalescing import Coalescer
from tests.conftest import settle


class Gate:
    """Calls that block until released, counting how many run at once."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.started: list[str] = []
        self.running = 0
        self.most = 0

    def call(self, name: str) -> Callable[[], asyncio.Future[str]]:
        async def run() -> str:
            self.started.append(name)
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                await self.open.wait()
                return name
            finally:
                self.running -= 1

        return run  # type: ignore[return-value]


def overloaded() -> str:
    return "overloaded"


async def test_beyond_max_inflight_callers_wait_and_run_in_arrival_order() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=2, max_waiting=10, wait_timeout=5)
    tasks = [asyncio.create_task(coalescer.run(k, gate.call(k), overloaded=overloaded)) for k in "abcde"]
    await settle(lambda: coalescer.waiting == 3)
    assert gate.started == ["a", "b"]
    gate.open.set()
    assert await asyncio.gather(*tasks) == list("abcde")
    assert gate.started == list("abcde") and gate.most == 2
    assert coalescer.shed == 0 and coalescer.waited == 3 and coalescer.outstanding == 0


async def test_a_full_line_refuses_at_once() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=1, wait_timeout=5)
    first = asyncio.create_task(coalescer.run("a", gate.call("a"), overloaded=overloaded))
    second = asyncio.create_task(coalescer.run("b", gate.call("b"), overloaded=overloaded))
    await settle(lambda: coalescer.waiting == 1)
    assert await coalescer.run("c", gate.call("c"), overloaded=overloaded) == "overloaded"
    gate.open.set()
    assert await asyncio.gather(first, second) == ["a", "b"]
    assert coalescer.shed == 1


async def test_no_line_without_max_waiting() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1)
    first = asyncio.create_task(coalescer.run("a", gate.call("a"), overloaded=overloaded))
    await settle(lambda: coalescer.outstanding == 1)
    assert await coalescer.run("b", gate.call("b"), overloaded=overloaded) == "overloaded"
    gate.open.set()
    assert await first == "a"


async def test_a_waiter_whose_key_started_meanwhile_shares_that_call() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=10, wait_timeout=5)
    tasks = [asyncio.create_task(coalescer.run(k, gate.call(k), overloaded=overloaded)) for k in ("a", "b", "b")]
    await settle(lambda: coalescer.waiting == 1 and len(gate.started) == 1)
    gate.open.set()
    assert await asyncio.gather(*tasks) == ["a", "b", "b"]
    assert gate.started == ["a", "b"] and coalescer.coalesced == 1 and coalescer.waited == 1


async def test_a_waiter_cancelled_after_its_turn_came_passes_the_slot_on() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=10, wait_timeout=5)
    first = asyncio.create_task(coalescer.run("a", gate.call("a"), overloaded=overloaded))
    leaving = asyncio.create_task(coalescer.run("b", gate.call("b"), overloaded=overloaded))
    staying = asyncio.create_task(coalescer.run("c", gate.call("c"), overloaded=overloaded))
    await settle(lambda: coalescer.waiting == 2)
    # Runs right after the coalescer has handed a's slot to "b", before "b" can use it.
    coalescer._inflight["a"].add_done_callback(lambda _: leaving.cancel())
    gate.open.set()
    assert await first == "a"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await staying == "c"
    assert gate.started == ["a", "c"] and coalescer.outstanding == 0 and coalescer.waiting == 0


async def test_a_waiter_cancelled_in_line_leaves_it() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=10, wait_timeout=5)
    first = asyncio.create_task(coalescer.run("a", gate.call("a"), overloaded=overloaded))
    leaving = asyncio.create_task(coalescer.run("b", gate.call("b"), overloaded=overloaded))
    sharing = asyncio.create_task(coalescer.run("b", gate.call("b"), overloaded=overloaded))
    await settle(lambda: coalescer.waiting == 1)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    # The caller that shared its place lines up anew and still gets its answer.
    await settle(lambda: coalescer.waiting == 1)
    gate.open.set()
    assert await asyncio.gather(first, sharing) == ["a", "b"]
    assert gate.started == ["a", "b"] and coalescer.waiting == 0


async def test_waiting_longer_than_the_timeout_is_shed() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=10, wait_timeout=0.02)
    first = asyncio.create_task(coalescer.run("a", gate.call("a"), overloaded=overloaded))
    await settle(lambda: coalescer.outstanding == 1)
    assert await coalescer.run("b", gate.call("b"), overloaded=overloaded) == "overloaded"
    assert coalescer.shed == 1 and coalescer.waiting == 0
    gate.open.set()
    assert await first == "a"
    # The slot freed by "a" is free for the next caller: nothing was left reserved.
    assert await coalescer.run("c", gate.call("c"), overloaded=overloaded) == "c"


async def test_cancel_all_ends_calls_and_line() -> None:
    gate = Gate()
    coalescer: Coalescer[str] = Coalescer(max_inflight=1, max_waiting=10, wait_timeout=5)
    tasks = [asyncio.create_task(coalescer.run(k, gate.call(k), overloaded=overloaded)) for k in "ab"]
    await settle(lambda: coalescer.waiting == 1)
    coalescer.cancel_all()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert coalescer.outstanding == 0 and coalescer.waiting == 0


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(0, 6), min_size=1, max_size=40),
    cancelled=st.sets(st.integers(0, 39), max_size=10),
    max_inflight=st.integers(1, 4),
    max_waiting=st.integers(0, 12),
)
def test_any_mix_of_callers_keeps_the_bounds_and_leaves_nothing_behind(
    keys: list[int], cancelled: set[int], max_inflight: int, max_waiting: int
) -> None:
    async def scenario() -> None:
        running = 0
        most = 0

        def call_for(key: int) -> Callable[[], asyncio.Future[str]]:
            async def run() -> str:
                nonlocal running, most
                running += 1
                most = max(most, running)
                try:
                    for _ in range(key % 3 + 1):
                        await asyncio.sleep(0)
                    return str(key)
                finally:
                    running -= 1

            return run  # type: ignore[return-value]

        coalescer: Coalescer[str] = Coalescer(max_inflight=max_inflight, max_waiting=max_waiting, wait_timeout=5)
        tasks = [asyncio.create_task(coalescer.run(k, call_for(k), overloaded=overloaded)) for k in keys]
        await asyncio.sleep(0)
        for index in cancelled:
            if index < len(tasks):
                tasks[index].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert most <= max_inflight
        for index, (key, result) in enumerate(zip(keys, results, strict=True)):
            if isinstance(result, asyncio.CancelledError):
                assert index in cancelled
            else:
                assert result in (str(key), "overloaded")
        # A call whose callers all left still runs to its end (others may yet join it).
        await settle(lambda: coalescer.outstanding == 0)
        assert coalescer.waiting == 0
        assert coalescer._reserved == 0 and not coalescer._queued

    asyncio.run(scenario())
