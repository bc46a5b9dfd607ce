"""One aiohttp application served on one configured listener.

Shared by every aiohttp-based listener (HTTP, health, MQTT over WebSocket), so
they bind, size their accept backlog and set up TLS the same way.
"""

from __future__ import annotations

import socket

from aiohttp import web

from gateway.config_types import ListenerConfig
from gateway.frontends.tcp_listener import LISTEN_BACKLOG
from gateway.frontends.tls import server_ssl_context



def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; "" binds every interface (IPv4 and IPv6 on one port)."""
    host = host.strip("[]")
    if not host:
        if socket.has_dualstack_ipv6():
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, backlog=LISTEN_BACKLOG, dualstack_ipv6=True
            )
        return socket.create_server(("0.0.0.0", port), backlog=LISTEN_BACKLOG)
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)


class AiohttpListener:
    """Serves one aiohttp application on one configured listener."""

    def __init__(
        self,
        app: web.Application,
        listener: ListenerConfig,
        *,
        shutdown_timeout: float,
        handler_cancellation: bool = False,
        keepalive_timeout: float | None = None,
    ) -> None:
        """`keepalive_timeout`: also how long a new connection may take to send its
        first request (None: aiohttp's default)."""
        self._app = app
        self._listener = listener
        self._shutdown_timeout = shutdown_timeout
        self._handler_cancellation = handler_cancellation
        self._runner_options: dict[str, float] = {}
        if keepalive_timeout is not None:
            self._runner_options["keepalive_timeout"] = keepalive_timeout
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._accepting = False
        self._bound: tuple[str, int] | None = None

    async def start(self) -> None:
        listener = self._listener
        ssl_context = server_ssl_context(listener) if listener.tls else None
        sock = bind_socket(listener.host, listener.port)
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._shutdown_timeout,
            handler_cancellation=self._handler_cancellation,
            **self._runner_options,
        )
        try:
            await runner.setup()
            site = web.SockSite(runner, sock, ssl_context=ssl_context, backlog=LISTEN_BACKLOG)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner, self._site, self._accepting = runner, site, True
        host, port = sock.getsockname()[:2]
        self._bound = (host, port)

    @property
    def bound(self) -> tuple[str, int]:
        if self._bound is None:
            raise RuntimeError(f"{self._listener.name} is not started")
        return self._bound

    async def stop_accepting(self) -> None:
        if self._site is not None and self._accepting:
            self._accepting = False
            # Closes only the listening socket; connections already accepted keep going.
            await self._site.stop()

    async def aclose(self) -> None:
        self._accepting = False
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()
