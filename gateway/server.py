"""Startup and shutdown of the whole gateway, in one fixed order for every frontend.

Start: the store (what it kept is restored: retained messages, persistent
sessions, durable queues), the provider, then listeners (a failure closes
what was opened), then ready.
Stop, within `server.shutdown_timeout`: stop accepting; stop taking publishes
(what arrives now is not acknowledged, acknowledgements still flow); deliver
what connected clients are owed; close every connection, cancel what
remains, close listeners and the provider; commit the store.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol as TypingProtocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.config_types import GatewayConfig, LimitsConfig, ListenerConfig
from gateway.context import FrontendContext
from gateway.dispatcher import Dispatcher
from gateway.errors import PolygateError
from gateway.frontends.registry import FRONTENDS, frontend_class
from gateway.metrics import Metrics
from gateway.providers import AuthProvider
from gateway.ratelimit import RateLimits
from gateway.queues import DEFAULT_WINDOW, MemoryBudget
from gateway.router import Router
from gateway.state import GatewayState
from gateway.store import open_store

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
        self.state = GatewayState(config.limits)
        self.store = open_store(config.storage)
        self.budget = MemoryBudget(config.limits.memory_high_watermark)
        self.router = Router(
            max_retained=config.limits.max_retained_messages,
            max_topic_length=config.limits.max_topic_length,
            budget=self.budget,
            store=self.store,
        )
        self.metrics.add_collector(self._router_metrics)
        self.metrics.add_collector(self._storage_metrics)
        self.metrics.add_collector(self.state.collect_metrics)
        self.dispatcher = Dispatcher(config.auth, limits=config.limits, metrics=self.metrics, provider=provider)
        self.ctx = FrontendContext(
            config=config,
            dispatcher=self.dispatcher,
            router=self.router,
            metrics=self.metrics,
            state=self.state,
            ratelimits=RateLimits(config.ratelimit),
            store=self.store,
        )
        self.frontends: dict[str, list[Frontend]] = {}
        self.health: Frontend | None = None
        self._listening = False
        self._store_open = False
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

    def _storage_metrics(self) -> Iterable[Metric]:
        budget = self.budget
        queued = GaugeMetricFamily("polygate_queued_messages", "Messages waiting in subscriber queues",
                                   labels=["where"])
        queued.add_metric(["memory"], budget.messages)
        queued.add_metric(["store"], budget.paged)
        used = GaugeMetricFamily("polygate_queued_memory_bytes", "Memory held by queued messages (estimate)")
        used.add_metric([], budget.used)
        alarm = GaugeMetricFamily("polygate_memory_alarm", "1 while queued messages are above limits.memory_high_watermark")
        alarm.add_metric([], 1 if budget.alarm else 0)
        families: list[Metric] = [queued, used, alarm]
        store = self.store
        if store.durable:
            commits = CounterMetricFamily("polygate_store_commits", "Batches committed to the store")
            commits.add_metric([], getattr(store, "commits", 0))
            rows = CounterMetricFamily("polygate_store_messages_written", "Messages written to the store")
            rows.add_metric([], getattr(store, "rows_written", 0))
            skipped = CounterMetricFamily(
                "polygate_store_writes_skipped", "Messages acknowledged by their consumer before they had to be written")
            skipped.add_metric([], getattr(store, "writes_cancelled", 0))
            failing = GaugeMetricFamily("polygate_store_failing", "1 while commits to the store fail")
            failing.add_metric([], 1 if getattr(store, "failing", False) else 0)
            families += [commits, rows, skipped, failing]
        return families

    def ready(self) -> bool:
        if not self._listening or self.state.shutting_down or not self.dispatcher.ready():
            return False
        if getattr(self.store, "failing", False):
            return False
        # A listener that stopped serving (a UDP socket no longer read) makes the gateway not ready.
        return all(getattr(f, "serving", _always)() for fs in self.frontends.values() for f in fs)

    def bound(self, kind: str) -> list[tuple[str, int]]:
        """Where listeners of a kind ("tcp", "http", "health", ...) actually listen."""
        if kind == "health":
            return [self.health.bound] if self.health is not None else []
        return [f.bound for f in self.frontends.get(kind, [])]

    async def start(self) -> None:
        self.state.max_total = connection_budget(raise_fd_limit(), self.config.limits)
        install_accept_error_handler(asyncio.get_running_loop())
        await self._restore()
        try:
            await self.dispatcher.start()
            await self._start_listeners()
        except BaseException:
            await self.stop()
            raise
        self._listening = True

    async def _restore(self) -> None:
        """Open the store and put back what it kept, before any listener opens."""
        snapshot = await self.store.open(window=DEFAULT_WINDOW)
        self._store_open = True
        self.router.restore_retained(snapshot.retained)
        prepared: set[object] = set()
        server = self.config.server
        for kind in FRONTENDS:
            if not getattr(server, kind):
                continue
            prepare = getattr(frontend_class(kind), "prepare", None)
            if prepare is not None and prepare not in prepared:
                prepared.add(prepare)
                prepare(self.ctx, snapshot)
        storage = self.config.storage
        if self.store.durable:
            log.info("storage: %s at %s (fsync %s): %d retained message(s), %d durable queue(s) and session(s)",
                     storage.backend, storage.path, storage.fsync, len(snapshot.retained), len(snapshot.queues),
                     extra={"event": "storage_opened"})

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
        loop = asyncio.get_running_loop()
        timeout = self.config.server.shutdown_timeout
        deadline = loop.time() + timeout
        self.state.shutting_down = True
        everything = [f for fs in self.frontends.values() for f in fs]
        for frontend in everything:
            await frontend.stop_accepting()
        # Publishes stop being taken; what connected clients are owed goes out first.
        self.state.drain()
        waiting = await self.state.wait_drained(max(0.0, 0.6 * timeout))
        if waiting:
            log.warning("%d connection(s) still had messages to deliver after %gs; closing them", len(waiting),
                        0.6 * timeout, extra={"event": "shutdown_undelivered"})
        if self.budget.transient:
            log.warning("%d queued message(s) are held in memory only (clean sessions, non-durable queues, "
                        "streams, observers, or storage.backend memory) and are lost at this stop",
                        self.budget.transient, extra={"event": "shutdown_lost", "count": self.budget.transient})
        await self.state.close_all("gateway shutting down", max(0.1, deadline - loop.time()))
        for frontend in everything:
            try:
                await frontend.aclose()
            except Exception:
                log.exception("closing a listener failed")
        if self.health is not None:
            await self.health.aclose()
        await self.dispatcher.aclose()
        if self._store_open:
            await self.store.aclose(timeout=max(1.0, deadline - loop.time()))
        log.info("stopped", extra={"event": "stopped"})


def _always() -> bool:
    return True


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (both logged); the soft limit now in force.

    The usual soft limit of 1,024 is used up by one client with 1,100 sockets;
    the hard limit is what the administrator allows this process.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, _NOFILE_CEILING)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.info("file descriptor limit raised from %d to %d (the hard limit)", soft, wanted,
                     extra={"event": "fd_limit", "soft": wanted, "hard": hard})
            return wanted
        except (OSError, ValueError) as exc:
            log.warning("file descriptor limit stays at %d (hard limit %d): %s", soft, hard, exc,
                        extra={"event": "fd_limit", "soft": soft, "hard": hard})
            return soft
    log.info("file descriptor limit: %d (hard limit %d)", soft, hard,
             extra={"event": "fd_limit", "soft": soft, "hard": hard})
    return 0 if soft == resource.RLIM_INFINITY else soft


def connection_budget(fd_limit: int, limits: LimitsConfig) -> int:
    """Client connections all listeners may hold together: the descriptors minus `limits.fd_reserve` (0 = no cap).

    A connection beyond it is accepted and closed at once, so its descriptor is
    free again and the health listener, the store and new connections from
    other sources always find one.
    """
    if fd_limit <= 0:
        return 0
    budget = max(1, fd_limit - limits.fd_reserve)
    per_ip = limits.max_connections_per_ip
    if per_ip == 0 or per_ip >= budget:
        log.warning("limits.max_connections_per_ip (%s) does not keep one source below the %d connections the "
                    "file descriptor limit allows: one source can take them all", per_ip or "no cap", budget,
                    extra={"event": "fd_budget", "budget": budget})
    return budget


#: Accept errors that mean "no descriptor or buffer left": the loop retries, and they are logged once per interval.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds between two log lines about accept failing for want of descriptors.
ACCEPT_ERROR_LOG_INTERVAL = 10.0
#: Where the soft limit goes when the hard limit is unlimited.
_NOFILE_CEILING = 1 << 20


class AcceptErrorHandler:
    """The loop's exception handler, wrapped: accept failing with EMFILE/ENFILE is logged once per interval.

    asyncio then stops accepting on that socket for a second (its
    ACCEPT_RETRY_DELAY) instead of spinning, and logs every failure at ERROR;
    under a flood that is a line per attempt. Here it is one line per
    interval with the count; anything else goes to the previous handler.
    """

    def __init__(self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
                 interval: float = ACCEPT_ERROR_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._previous = previous
        self.interval = interval
        self._clock = clock
        self._last = -math.inf
        self.suppressed = 0
        self.total = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self.total += 1
            now = self._clock()
            if now - self._last >= self.interval:
                log.error("cannot accept connections: %s (%d more since the last report); retrying after a pause",
                          exc.strerror or exc, self.suppressed,
                          extra={"event": "accept_failed", "errno": exc.errno, "count": self.suppressed + 1})
                self._last = now
                self.suppressed = 0
            else:
                self.suppressed += 1
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


def install_accept_error_handler(loop: asyncio.AbstractEventLoop) -> AcceptErrorHandler:
    current = loop.get_exception_handler()
    if isinstance(current, AcceptErrorHandler):
        return current
    handler = AcceptErrorHandler(current)
    loop.set_exception_handler(handler)
    return handler
