"""Run a real gateway in a thread of its own, for tests that drive it with real clients.

Blocking clients (paho, pika) and clients with their own event loop (amqtt,
aiohttp under asyncio.run) then talk to it over loopback sockets exactly as
they would to a deployed gateway.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from gateway.config import parse_config
from gateway.config_types import GatewayConfig
from gateway.providers import AuthProvider
from gateway.server import Gateway

T = TypeVar("T")


class GatewayThread:
    def __init__(self, config: GatewayConfig, *, provider: AuthProvider | None = None,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> None:
        self.config = config
        self.provider = provider
        self.gateway: Gateway | None = None
        #: uvloop's `new_event_loop` runs the gateway on the loop `polygate[fast]` installs.
        self.loop = loop_factory()
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._started: Future[None] = Future()
        self._stop: asyncio.Event | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, provider: AuthProvider | None = None,
                  loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop) -> GatewayThread:
        return cls(parse_config(data), provider=provider, loop_factory=loop_factory)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self.gateway = Gateway(self.config, provider=self.provider)
            await self.gateway.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        await self._stop.wait()
        await self.gateway.stop()

    def start(self, timeout: float = 15.0) -> GatewayThread:
        self._thread.start()
        self._started.result(timeout)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a plain function on the gateway's loop (to read its state safely)."""

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, kind: str) -> int:
        assert self.gateway is not None
        return self.gateway.bound(kind)[0][1]

    @property
    def mqtt_port(self) -> int:
        return self.port("tcp")

    @property
    def http_port(self) -> int:
        return self.port("http")

    @property
    def health_port(self) -> int:
        return self.port("health")

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
