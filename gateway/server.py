"""Startup and shutdown of the whole gateway, in one fixed order for every frontend.

Start: provider, then listeners (a failure closes what was opened), then ready.
Stop: stop accepting, ask every connection to close, wait a bounded time,
cancel what remains, close listeners, close the provider.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Protocol as TypingProtocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.config_types import GatewayConfig, ListenerConfig
from gateway.context import FrontendContext
from gateway.dispatcher import Dispatcher
from gateway.errors import PolygateError
from gateway.frontends.registry import FRONTENDS, frontend_class
from gateway.metrics import Metrics
from gateway.providers import AuthProvider
from gateway.ratelimit import RateLimits
from gateway.router import Router
from gateway.state import GatewayState

log = logging.getLogger("polygate.server")


class Frontend(TypingProtocol):
    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None: ...

    async def start(self) -> None: ...

    @property
    def bound(self) -> tuple[str, int]: ...

    async def stop_accepting(self) -> None: ...

    async def aclose(self) -> None: ...


class ListenerStartError(PolygateError):
    pass


class Gateway:
    def __init__(self, config: GatewayConfig, *, provider: AuthProvider | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.state = GatewayState()
        self.router = Router(
            max_retained=config.limits.max_retained_messages,
            max_topic_length=config.limits.max_topic_length,
        )
        self.metrics.add_collector(self._router_metrics)
        self.dispatcher = Dispatcher(config.auth, limits=config.limits, metrics=self.metrics, provider=provider)
        self.ctx = FrontendContext(
            config=config,
            dispatcher=self.dispatcher,
            router=self.router,
            metrics=self.metrics,
            state=self.state,
            ratelimits=RateLimits(config.ratelimit),
        )
        self.frontends: dict[str, list[Frontend]] = {}
        self.health: Frontend | None = None
        self._listening = False
        self._stopped = asyncio.Event()

    def _router_metrics(self) -> Iterable[Metric]:
        retained = GaugeMetricFamily("polygate_retained_messages", "Retained messages stored")
        retained.add_metric([], self.router.retained_count)
        subscriptions = GaugeMetricFamily("polygate_subscriptions", "Subscriptions in the router, all protocols")
        subscriptions.add_metric([], self.router.subscription_count)
        refused = CounterMetricFamily(
            "polygate_retained_refused", "Retained messages not stored: limits.max_retained_messages reached"
        )
        refused.add_metric([], self.router.retained_refused)
        errors = CounterMetricFamily("polygate_delivery_errors", "Deliveries a subscriber failed to accept")
        errors.add_metric([], self.router.delivery_errors)
        return [retained, subscriptions, refused, errors]

    def ready(self) -> bool:
        return self._listening and not self.state.shutting_down and self.dispatcher.ready()

    def bound(self, kind: str) -> list[tuple[str, int]]:
        """Where listeners of a kind ("tcp", "http", "health", ...) actually listen."""
        if kind == "health":
            return [self.health.bound] if self.health is not None else []
        return [f.bound for f in self.frontends.get(kind, [])]

    async def start(self) -> None:
        await self.dispatcher.start()
        try:
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        self._listening = True

    async def _start_listeners(self) -> None:
        server = self.config.server
        if server.health is not None:
            from gateway.health import HealthServer

            health = HealthServer(self.ctx, server.health, self.ready)
            await self._start_one(health, server.health)
            self.health = health
        for kind in FRONTENDS:
            listeners = getattr(server, kind)
            if not listeners:
                continue
            cls = frontend_class(kind)
            for listener in listeners:
                frontend = cls(self.ctx, listener)
                await self._start_one(frontend, listener)
                self.frontends.setdefault(kind, []).append(frontend)

    async def _start_one(self, frontend: Frontend, listener: ListenerConfig) -> None:
        try:
            await frontend.start()
        except OSError as exc:
            raise ListenerStartError(f"{listener.name}: cannot listen on {listener.addr!r}: {exc.strerror or exc}") from exc
        host, port = frontend.bound
        log.info("listening on %s:%d (%s)", host, port, listener.name,
                 extra={"event": "listening", "listener": listener.name, "host": host, "port": port})

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.state.shutting_down = True
        everything = [f for fs in self.frontends.values() for f in fs]
        for frontend in everything:
            await frontend.stop_accepting()
        await self.state.close_all("gateway shutting down", self.config.server.shutdown_timeout)
        for frontend in everything:
            try:
                await frontend.aclose()
            except Exception:
                log.exception("closing a listener failed")
        if self.health is not None:
            await self.health.aclose()
        await self.dispatcher.aclose()
        log.info("stopped", extra={"event": "stopped"})
