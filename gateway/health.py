"""The health listener: `/health` (alive), `/ready` (can serve), `/metrics` (Prometheus text).

Kept apart from the client listeners so probes and scrapes never compete with
client traffic, and never need credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.frontends.aiohttp_listener import AiohttpListener
from gateway.frontends.http import error_boundary, error_response

log = logging.getLogger("polygate.health")


class HealthServer:
    def __init__(self, ctx: FrontendContext, listener: ListenerConfig, ready: Callable[[], bool]) -> None:
        self._ctx = ctx
        self._ready = ready
        app = web.Application(middlewares=[error_boundary], client_max_size=4096)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._readiness)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._server = AiohttpListener(app, listener, shutdown_timeout=ctx.config.server.shutdown_timeout)

    async def start(self) -> None:
        await self._server.start()

    @property
    def bound(self) -> tuple[str, int]:
        return self._server.bound

    async def stop_accepting(self) -> None:
        await self._server.stop_accepting()

    async def aclose(self) -> None:
        await self._server.aclose()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readiness(self, request: web.Request) -> web.Response:
        try:
            ready = bool(self._ready())
        except Exception:
            # A probe that crashes must read as "not ready", never as ready.
            log.exception("readiness check failed")
            ready = False
        if ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _not_found(self, request: web.Request) -> web.Response:
        if request.rel_url.path in ("/health", "/ready", "/metrics"):
            return error_response(405, "use GET", {"Allow": "GET"})
        return error_response(404, "not found: use GET /health, /ready or /metrics")
