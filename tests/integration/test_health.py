"""The health listener over a real loopback socket: /health, /ready, /metrics."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config_types import GatewayConfig, ListenerConfig
from gateway.context import FrontendContext
from gateway.dispatcher import Dispatcher
from gateway.events import Action, Outcome, Protocol
from gateway.health import HealthServer
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimits
from gateway.router import Router
from gateway.state import GatewayState


class Ready:
    def __init__(self) -> None:
        self.value = False
        self.fail = False

    def __call__(self) -> bool:
        if self.fail:
            raise RuntimeError("probe broke")
        return self.value


class NeverAsked:
    """The health listener must not need an auth provider."""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: object) -> object:
        raise AssertionError("the health listener asked the auth provider")

    async def authorize(self, event: object, identity: object) -> object:
        raise AssertionError("the health listener asked the auth provider")


@pytest.fixture
async def health() -> AsyncIterator[tuple[HealthServer, str, Ready, Metrics, aiohttp.ClientSession]]:
    config = GatewayConfig()
    metrics = Metrics()
    dispatcher = Dispatcher(config.auth, limits=config.limits, metrics=metrics, provider=NeverAsked())  # type: ignore[arg-type]
    ctx = FrontendContext(
        config=config,
        dispatcher=dispatcher,
        router=Router(),
        metrics=metrics,
        state=GatewayState(),
        ratelimits=RateLimits(config.ratelimit),
    )
    ready = Ready()
    listener = ListenerConfig(name="server.health_addr", addr="127.0.0.1:0", host="127.0.0.1", port=0)
    server = HealthServer(ctx, listener, ready)
    async with contextlib.AsyncExitStack() as stack:
        await server.start()
        stack.push_async_callback(server.aclose)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        host, port = server.bound
        yield server, f"http://{host}:{port}", ready, metrics, session


Fixture = tuple[HealthServer, str, Ready, Metrics, aiohttp.ClientSession]


async def test_health_is_ok_while_the_process_serves(health: Fixture) -> None:
    _, url, _, _, session = health
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_ready_follows_the_probe_and_a_broken_probe_is_not_ready(health: Fixture) -> None:
    _, url, ready, _, session = health
    async with session.get(f"{url}/ready") as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "not ready"}
    ready.value = True
    async with session.get(f"{url}/ready") as resp:
        assert resp.status == 200
    ready.fail = True
    async with session.get(f"{url}/ready") as resp:
        assert resp.status == 503


async def test_metrics_are_prometheus_text(health: Fixture) -> None:
    _, url, _, metrics, session = health
    metrics.connection_opened(Protocol.HTTP)
    metrics.auth_decision(Protocol.MQTT, Action.CONNECT, Outcome.DENY)
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    assert 'polygate_connections{protocol="http"} 1.0' in text
    assert 'polygate_auth_decisions_total{action="connect",outcome="deny",protocol="mqtt"} 1.0' in text


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/health", 405), ("DELETE", "/metrics", 405), ("GET", "/nope", 404), ("GET", "/", 404)],
)
async def test_other_paths_and_methods(health: Fixture, method: str, path: str, status: int) -> None:
    _, url, _, _, session = health
    async with session.request(method, f"{url}{path}") as resp:
        assert resp.status == status
        assert "error" in await resp.json()


async def test_stop_accepting_closes_the_listening_socket(health: Fixture) -> None:
    server, url, _, _, session = health
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200
    await server.stop_accepting()
    await server.stop_accepting()  # idempotent
    async with aiohttp.ClientSession() as fresh:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with fresh.get(f"{url}/health"):
                pass
    # A connection accepted before keeps being served.
    async with session.get(f"{url}/health") as resp:
        assert resp.status == 200


def test_bound_before_start_says_so() -> None:
    config = GatewayConfig()
    metrics = Metrics()
    ctx = FrontendContext(
        config=config,
        dispatcher=Dispatcher(config.auth, limits=config.limits, metrics=metrics, provider=NeverAsked()),  # type: ignore[arg-type]
        router=Router(),
        metrics=metrics,
        state=GatewayState(),
        ratelimits=RateLimits(config.ratelimit),
    )
    server = HealthServer(ctx, ListenerConfig(name="server.health_addr", addr=":0", host="", port=0), lambda: True)
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.bound

