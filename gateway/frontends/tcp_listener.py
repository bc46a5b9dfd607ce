"""The listening half every TCP frontend shares: bind (plain or TLS), report, close.

A frontend subclasses `TCPListener` and says which connection object serves
each accepted socket; the lifecycle (`start`, `bound`, `stop_accepting`,
`aclose`) is the same for all of them.
"""

from __future__ import annotations

import abc
import asyncio
import ssl
from collections.abc import Callable

from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.frontends.tls import server_ssl_context
from gateway.frontends.tls_accept import tls_accepting

#: Large, so connection storms queue in the kernel instead of being refused
#: (LIBRARIES.md: a backlog of 128 shaped storm latency more than auth did).
LISTEN_BACKLOG = 4096


class TCPListener(abc.ABC):
    #: Whose metrics a connection refused before its protocol began counts in.
    protocol: Protocol

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None:
        self.ctx = ctx
        self.listener = listener
        self._server: asyncio.Server | None = None
        self._ssl: ssl.SSLContext | None = server_ssl_context(listener) if listener.tls else None

    @abc.abstractmethod
    def connection_factory(self) -> Callable[[], asyncio.BaseProtocol]:
        """Makes the protocol object for each accepted connection."""

    async def start(self) -> None:
        self.ctx.state.set_limit(self.listener.name, self.listener.max_connections, self.listener.allowed_cidrs)
        loop = asyncio.get_running_loop()
        factory = self.connection_factory()
        if self._ssl is not None:
            # TLS is handshaken by the listener itself: see tls_accept.
            factory = tls_accepting(self.ctx, self.listener.name, self.protocol, self._ssl, factory)
        self._server = await loop.create_server(
            factory,
            host=self.listener.host or None,
            port=self.listener.port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )

    @property
    def bound(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
