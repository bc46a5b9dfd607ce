"""A pool of worker threads for CPU-bound auth work (Argon2), taken in turns by source.

argon2-cffi releases the GIL, so one thread per core verifies that many
passwords at once. A flood of wrong passwords from one address must not push
everyone else's check back by its whole length: callers line up per source
(the peer's IP) and a free worker takes the oldest job of the next source in
turn, so a legitimate client waits for about one job per flooding source, not
for the flood. A caller waits at most `max_wait` for its turn; past that it gets
`PoolBusy` ("try again later"), and its job is never run.

The pool never hands the executor more jobs than it has threads, so nothing
queues out of sight inside the executor where it could neither be reordered
nor given up.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class PoolBusy(Exception):
    """No worker was free for this job within `max_wait`."""


class PoolClosed(Exception):
    """The pool was shut down."""


def core_count() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class FairPool:
    def __init__(self, workers: int, *, max_wait: float, name: str = "polygate-worker") -> None:
        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        if max_wait <= 0:
            raise ValueError("max_wait must be positive")
        self.workers = workers
        self.max_wait = max_wait
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._running = 0
        #: source -> its callers' turns, oldest first; the dict's order is the round-robin order.
        self._lines: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._waiting = 0
        #: Jobs run to completion, and jobs refused because their turn did not come within max_wait.
        self.completed = 0
        self.busy = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    async def run(self, source: str, work: Callable[[], T]) -> T:
        """`work()` on a worker thread once this source's turn comes; `PoolBusy` after `max_wait`."""
        if self._executor is None:
            raise PoolClosed("the pool is shut down")
        if self._running < self.workers and not self._waiting:
            self._running += 1
        else:
            await self._wait_turn(source)
        executor = self._executor
        if executor is None:
            self._release()
            raise PoolClosed("the pool is shut down")
        try:
            job = asyncio.get_running_loop().run_in_executor(executor, work)
        except RuntimeError as exc:  # shut down between the check and the submit
            self._release()
            raise PoolClosed("the pool is shut down") from exc
        # The worker's slot is freed when the work really ends, not when a cancelled caller leaves:
        # otherwise the executor would be handed more jobs than it has threads.
        job.add_done_callback(self._job_done)
        return await asyncio.shield(job)

    def shutdown(self) -> None:
        executor, self._executor = self._executor, None
        for line in self._lines.values():
            for turn in line:
                if not turn.done():
                    turn.set_exception(PoolClosed("the pool is shut down"))
        self._lines.clear()
        self._waiting = 0
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # -- internals --------------------------------------------------------------------------

    async def _wait_turn(self, source: str) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lines.setdefault(source, collections.deque()).append(turn)
        self._waiting += 1
        try:
            async with asyncio.timeout(self.max_wait):
                await turn
        except TimeoutError:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                return  # handed a worker in the same loop turn as the deadline: use it
            self._leave(turn)
            self.busy += 1
            raise PoolBusy(f"no worker free within {self.max_wait:g}s") from None
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # handed a worker, then cancelled before using it: pass it on
            else:
                self._leave(turn)
            raise

    def _leave(self, turn: asyncio.Future[None]) -> None:
        """A caller gave up its place; the turn stays in its line, skipped when reached."""
        if not turn.done():
            turn.cancel()
            self._waiting -= 1
        elif turn.cancelled():
            # Cancelled along with its caller's task (a deadline, a client gone): not handed a worker.
            self._waiting -= 1

    def _job_done(self, _: object) -> None:
        self.completed += 1
        self._release()

    def _release(self) -> None:
        """A worker is free: hand it to the next source in turn, or mark it idle."""
        lines = self._lines
        while lines:
            source = next(iter(lines))
            line = lines.pop(source)
            turn = line.popleft()
            if line:
                lines[source] = line  # back of the round
            if turn.done():
                continue  # its caller gave up
            self._waiting -= 1
            turn.set_result(None)
            return
        self._running -= 1
