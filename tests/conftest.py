from __future__ import annotations

import asyncio

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_thread import GatewayThread

ROOT_USER = "root"


def loopback_config(tmp_path: Path, *, auth: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A config with MQTT, HTTP and health on loopback, ports chosen by the OS."""
    server = {
        "tcp": {"plain": {"addr": "127.0.0.1:0"}},
        "http": {"plain": {"addr": "127.0.0.1:0"}},
        "health_addr": "127.0.0.1:0",
        "shutdown_timeout": "2s",
    }
    server.update(sections.pop("server", {}))
    auth_section: dict[str, Any] = {"provider": "local", "local": {"db": str(tmp_path / "auth.db")}}
    if auth:
        local = {**auth_section["local"], **auth.get("local", {})}
        auth_section.update(auth)
        auth_section["local"] = local
    sections.setdefault("storage", {"path": str(tmp_path / "polygate-data")})
    return {"server": server, "auth": auth_section, **sections}


@pytest.fixture
def root_password(monkeypatch: pytest.MonkeyPatch) -> str:
    password = secrets.token_urlsafe(12)
    monkeypatch.setenv("POLYGATE_ROOT_USERNAME", ROOT_USER)
    monkeypatch.setenv("POLYGATE_ROOT_PASSWORD", password)
    return password


LOOPS = ("asyncio", "uvloop")


def loop_factory_of(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop a gateway runs on: asyncio's, or uvloop's (what `polygate[fast]` users get)."""
    if name == "asyncio":
        return asyncio.new_event_loop
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop  # type: ignore[no-any-return]


@pytest.fixture
def gateway_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """Where the gateways of `start_gateway` run; tests/integration/conftest.py makes it both loops."""
    return asyncio.new_event_loop


@pytest.fixture
def start_gateway(
    tmp_path: Path, root_password: str, gateway_loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> Iterator[Callable[..., GatewayThread]]:
    """Start gateways from config dicts; every one is stopped after the test."""
    started: list[GatewayThread] = []

    def start(config: dict[str, Any] | None = None, *, provider: Any = None, **kwargs: Any) -> GatewayThread:
        data = config if config is not None else loopback_config(tmp_path, **kwargs)
        if "storage" not in data:
            # Each gateway of a test keeps its store in a directory of its own.
            data = {**data, "storage": {"path": str(tmp_path / f"polygate-data-{len(started)}")}}
        gw = GatewayThread.from_dict(data, provider=provider, loop_factory=gateway_loop_factory).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    return start_gateway()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "auth.db")


async def settle(condition: Callable[[], bool], deadline_s: float = 5.0) -> None:
    """Poll `condition` on the running loop until it holds; fail after `deadline_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("POLYGATE_ROOT_PASSWORD", None)
    return env


class UnavailableProvider:
    """A provider whose service is down: every answer is unavailable.

    For frontend tests of the "auth service unavailable" path on every protocol;
    the callout tests show the same with a real external service stopped.
    """

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return False

    async def authenticate(self, event: Any) -> Any:
        from gateway.events import Decision

        return Decision.unavailable("auth service down (test)")

    async def authorize(self, event: Any, identity: Any) -> Any:
        from gateway.events import Decision

        return Decision.unavailable("auth service down (test)")
