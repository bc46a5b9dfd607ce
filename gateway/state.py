"""What the gateway knows about its live connections and background tasks.

Every frontend registers a connection when it is accepted and leaves when it
closes; shutdown then runs in one fixed order for all of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol as TypingProtocol, TypeVar

log = logging.getLogger("polygate.state")

T = TypeVar("T")


class Connection(TypingProtocol):
    def close(self, reason: str) -> None:
        """Begin closing: tell the peer when the protocol allows, then drop the transport."""


class GatewayState:
    def __init__(self) -> None:
        self._connections: dict[str, set[Connection]] = {}
        self._limits: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shared: dict[str, Any] = {}
        self.shutting_down = False

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """One object per gateway shared by listeners of one protocol (e.g. MQTT sessions)."""
        try:
            return self._shared[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._shared[key] = factory()
            return value

    def set_limit(self, listener: str, max_connections: int) -> None:
        self._limits[listener] = max_connections

    def register(self, listener: str, connection: Connection) -> bool:
        """Add a connection; False when the gateway is stopping or the listener is full."""
        if self.shutting_down:
            return False
        conns = self._connections.setdefault(listener, set())
        cap = self._limits.get(listener, 0)
        if cap and len(conns) >= cap:
            return False
        conns.add(connection)
        return True

    def unregister(self, listener: str, connection: Connection) -> None:
        conns = self._connections.get(listener)
        if conns is not None:
            conns.discard(connection)

    def count(self, listener: str | None = None) -> int:
        if listener is not None:
            return len(self._connections.get(listener, ()))
        return sum(len(c) for c in self._connections.values())

    def connections(self) -> list[Connection]:
        return [c for conns in self._connections.values() for c in conns]

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """A tracked background task: logged if it fails, cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def drain(self) -> None:
        """The gateway stops: every connection stops taking publishes (acknowledgements still flow)."""
        for conn in self.connections():
            drain = getattr(conn, "drain", None)
            if drain is not None:
                try:
                    drain()
                except Exception:
                    log.exception("draining a connection failed")

    def undrained(self) -> list[Connection]:
        """Connections still delivering what a restart would lose (a `drained()` that says False)."""
        waiting = []
        for conn in self.connections():
            drained = getattr(conn, "drained", None)
            if drained is not None and not drained():
                waiting.append(conn)
        return waiting

    async def wait_drained(self, timeout: float) -> list[Connection]:
        """Until every connection delivered what it holds for its client, or `timeout`; what still waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = self.undrained()
        while waiting and loop.time() < deadline:
            await asyncio.sleep(0.01)
            waiting = self.undrained()
        return waiting

    async def close_all(self, reason: str, timeout: float) -> None:
        """Ask every connection to close, wait up to `timeout`, then cancel tracked tasks."""
        self.shutting_down = True
        for conn in self.connections():
            try:
                conn.close(reason)
            except Exception:  # one broken connection must not stop the shutdown
                log.exception("closing a connection failed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.1, deadline - loop.time()))
