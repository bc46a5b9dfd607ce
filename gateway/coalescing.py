"""Coalescing of identical in-flight calls, with a bound on how many are outstanding.

A thousand devices reconnecting at once with the same credentials cause one
call: later callers await the first one's answer. The call runs as a task of
the coalescer's own, so a caller that goes away (client disconnected, request
cancelled) does not take the answer away from the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    def __init__(self, *, max_inflight: int = 0) -> None:
        #: At most this many distinct calls outstanding (0 = no bound).
        self.max_inflight = max_inflight
        self.coalesced = 0
        self.shed = 0
        self._inflight: dict[Hashable, asyncio.Task[T]] = {}

    @property
    def outstanding(self) -> int:
        return len(self._inflight)

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]], *, overloaded: Callable[[], T]) -> T:
        """`call()` once per key at a time; beyond `max_inflight` answer `overloaded()` at once."""
        pending = self._inflight.get(key)
        if pending is not None:
            self.coalesced += 1
            return await asyncio.shield(pending)
        if self.max_inflight and len(self._inflight) >= self.max_inflight:
            self.shed += 1
            return overloaded()
        task: asyncio.Task[T] = asyncio.ensure_future(call())  # type: ignore[arg-type]
        self._inflight[key] = task

        def finished(_: asyncio.Task[T]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]

        task.add_done_callback(finished)
        return await asyncio.shield(task)

    def cancel_all(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
