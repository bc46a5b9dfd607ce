"""Coalescing of identical in-flight calls, with a bound on how many are outstanding.

A thousand devices reconnecting at once with the same credentials cause one
call: later callers await the first one's answer. The call runs as a task of
the coalescer's own, so a caller that goes away (client disconnected, request
cancelled) does not take the answer away from the others.

Beyond `max_inflight` distinct calls, a caller waits in line for a free slot
(first come, first served) instead of being refused: a connection storm of
2,000 new identities is served in waves rather than half of it being told
"unavailable". The line is bounded twice, by its length (`max_waiting`) and by
how long anyone may stand in it (`wait_timeout`); past either bound the caller
gets `overloaded()` at once, which is counted as shed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Callers that may wait for a slot, per slot: a storm of new identities waits
#: its turn, yet the line stays bounded.
WAITING_PER_SLOT = 8

#: What callers sharing a place in line learn when its owner went away.
_LEFT = object()


class Coalescer(Generic[T]):
    def __init__(self, *, max_inflight: int = 0, max_waiting: int = 0, wait_timeout: float = 0.0) -> None:
        #: At most this many distinct calls outstanding (0 = no bound).
        self.max_inflight = max_inflight
        #: Callers that may wait for a slot when all are taken (0 = none may wait).
        self.max_waiting = max_waiting
        #: Longest wait for a slot, in seconds (only with max_waiting > 0).
        self.wait_timeout = wait_timeout
        self.coalesced = 0
        self.shed = 0
        #: Callers that had to wait for a slot (and got one or not).
        self.waited = 0
        self._inflight: dict[Hashable, asyncio.Task[T]] = {}
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        #: key -> the task its caller in line started (None: refused; _LEFT: the caller went away).
        self._queued: dict[Hashable, asyncio.Future[asyncio.Task[T] | object | None]] = {}
        # Slots handed to a woken waiter that has not started its call yet: a
        # newcomer arriving in between must not take them.
        self._reserved = 0

    @classmethod
    def with_line(cls, max_inflight: int, *, wait_timeout: float) -> Coalescer[T]:
        """At most `max_inflight` calls, and a line of WAITING_PER_SLOT callers per slot."""
        return cls(max_inflight=max_inflight, max_waiting=WAITING_PER_SLOT * max_inflight, wait_timeout=wait_timeout)

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]], *, overloaded: Callable[[], T]) -> T:
        """`call()` once per key at a time; a caller beyond `max_inflight` waits its turn or is refused."""
        while True:
            pending = self._inflight.get(key)
            if pending is not None:
                self.coalesced += 1
                return await asyncio.shield(pending)
            queued = self._queued.get(key)
            if queued is None:
                break
            # The same call already stands in line: share its place instead of taking one.
            started = await asyncio.shield(queued)
            if started is _LEFT:
                continue  # its caller went away: line up anew
            if started is None:
                self.shed += 1
                return overloaded()
            self.coalesced += 1
            return await asyncio.shield(started)
        if self.max_inflight and len(self._inflight) + self._reserved >= self.max_inflight:
            return await self._run_after_waiting(key, call, overloaded)
        return await asyncio.shield(self._start(key, call))

    async def _run_after_waiting(
        self, key: Hashable, call: Callable[[], Awaitable[T]], overloaded: Callable[[], T]
    ) -> T:
        queued: asyncio.Future[asyncio.Task[T] | object | None] = asyncio.get_running_loop().create_future()
        self._queued[key] = queued
        try:
            got_slot = await self._wait_for_slot()
        except BaseException:
            queued.set_result(_LEFT)
            raise
        finally:
            del self._queued[key]
        if not got_slot:
            queued.set_result(None)
            self.shed += 1
            return overloaded()
        self._reserved -= 1
        task = self._start(key, call)
        queued.set_result(task)
        return await asyncio.shield(task)

    def _start(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(call())  # type: ignore[arg-type]
        self._inflight[key] = task

        def finished(_: asyncio.Task[T]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
                self._wake_next()

        task.add_done_callback(finished)
        return task

    async def _wait_for_slot(self) -> bool:
        """Stand in line; True with a reserved slot, False when the line is full or the wait too long."""
        if len(self._waiting) >= self.max_waiting:
            return False
        self.waited += 1
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(self.wait_timeout):
                await turn
        except TimeoutError:
            # Woken in the same loop turn as the deadline: the slot is ours all the same.
            return turn.done() and not turn.cancelled()
        except BaseException:
            if turn.done() and not turn.cancelled():
                # Woken, then cancelled before using the slot: pass it on.
                self._reserved -= 1
                self._wake_next()
            raise
        finally:
            if not turn.done() or turn.cancelled():
                # Left the line before our turn came (woken turns were already taken off it).
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
        return True

    def _wake_next(self) -> None:
        while self._waiting and len(self._inflight) + self._reserved < self.max_inflight:
            turn = self._waiting.popleft()
            if not turn.done():
                self._reserved += 1
                turn.set_result(None)

    def cancel_all(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        while self._waiting:
            self._waiting.popleft().cancel()
        self._reserved = 0
