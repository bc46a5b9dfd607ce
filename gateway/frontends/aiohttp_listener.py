"""One aiohttp application served on one configured listener.

Shared by every aiohttp-based listener (HTTP, health, MQTT over WebSocket), so
they bind, size their accept backlog, set up TLS and report bad requests the
same way.

Bad requests. aiohttp logs a request it cannot parse at ERROR with a full
traceback whose text holds the offending header lines (an `Authorization`
value among them), so anyone could fill the log with tracebacks and
credentials. Its request handler takes the logger to use: ours turns a
client's malformed request into one WARNING line with the peer and the kind
of error, never a header value, first at once and then at most one line per
`BAD_REQUEST_LOG_INTERVAL` per listener with the count of those in between.
An exception that escapes a handler of ours is a bug, not bad input: it stays
an ERROR with its traceback (masked by `logging_setup.RedactingFilter`).

Connections. A client listener (HTTP, MQTT over WebSocket) is given an
`Admission`: each accepted TCP (or TLS) connection, not each request, then goes
through `GatewayState.admit` exactly as on the other TCP listeners, so the
listener's `max_connections`, `limits.max_connections_per_ip`, the allowed
networks and the file-descriptor budget count it, and a refused one is closed
at once, counted in polygate_connections_refused and logged once per interval.
aiohttp has no hook before its request handler takes a connection, so the
listener's sockets are served by `_AdmittingProtocol`, which admits first and
only then hands the connection to aiohttp's handler. The one exception: on a
listener that answers refused sources (HTTP's 403), a connection from outside
the allowed networks is kept, uncounted but at most `answer_not_allowed` at
once, until its request is answered.

Handshakes. aiohttp lets a connection take its keep-alive timeout (75 s for
HTTP) to send a request, and has no limit at all on how long the request's
headers may trickle in. Here each connection must deliver complete request
headers within `limits.handshake_timeout` of connecting, and of the first byte
after its previous request; a slow-loris client that never does is closed.
On a TLS listener the handshake runs first, admitted and bounded by the same
timeout (`gateway.frontends.tls_accept`, as on every TCP listener).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol as TypingProtocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.frontends.peers import peer_address
from gateway.frontends.tcp_listener import LISTEN_BACKLOG
from gateway.frontends.tls import server_ssl_context
from gateway.frontends.tls_accept import tls_accepting
from gateway.logging_setup import LogThrottle
from gateway.metrics import Metrics
from gateway.state import NOT_ALLOWED, GatewayState

log = logging.getLogger("polygate.http_server")

#: Seconds between two log lines about bad requests on one listener.
BAD_REQUEST_LOG_INTERVAL = 60.0


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


def client_error(exc: BaseException | None) -> HttpProcessingError | None:
    """The HTTP parsing error in `exc`'s chain (a bad request from the client), if any.

    A bad body (a `Content-Encoding` that does not decode) reaches handlers as
    aiohttp's RequestPayloadError caused by one.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, HttpProcessingError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class RequestErrorLog:
    """The `logger` of aiohttp's request handlers on one listener (module docstring)."""

    def __init__(self, listener_name: str, interval: float = BAD_REQUEST_LOG_INTERVAL) -> None:
        self.listener_name = listener_name
        self._throttle = LogThrottle(interval)
        #: Bad requests seen on this listener, logged or not.
        self.bad_requests = 0

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        # aiohttp logs non-HTTP bytes (TLS to a plain port, scanners) here with a
        # traceback of the bytes: one line without it is enough.
        if log.isEnabledFor(logging.DEBUG):
            exc = kwargs.get("exc_info")
            kind = f": {type(exc).__name__}" if isinstance(exc, BaseException) else ""
            log.debug("%s (listener %s)%s", msg % args if args else msg, self.listener_name, kind)

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            # The client left while its answer was being written (aiohttp's ClientConnectionResetError
            # is one): nothing is wrong on this side.
            log.debug("%s (listener %s): the client left", msg % args if args else msg, self.listener_name)
            return
        cause = client_error(exc)
        if cause is not None:
            if msg.startswith("Error handling request"):
                peer = args[0] if args else "?"
                self.bad_request(str(peer), f"{type(cause).__name__} ({cause.code})")
            else:
                # aiohttp reading the rest of a body whose error a handler already
                # answered (and counted): the same bad request again.
                log.debug("%s (listener %s): %s", msg, self.listener_name, type(cause).__name__)
            return
        log.error("%s (listener %s)", msg % args if args else msg, self.listener_name, exc_info=exc_info)

    error = exception

    def bad_request(self, peer: str, kind: str) -> None:
        """Count one bad request; log it when the throttle lets a line through."""
        self.bad_requests += 1
        suppressed = self._throttle.admit()
        if suppressed is None:
            return
        log.warning(
            "bad HTTP request from %s on %s: %s%s", peer, self.listener_name, kind,
            f" ({suppressed} more since the last such line)" if suppressed else "",
            extra={"event": "bad_request", "listener": self.listener_name, "peer": peer,
                   "suppressed": suppressed},
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """How a client listener admits its connections (module docstring, "Connections")."""

    ctx: FrontendContext
    #: The protocol refusals (and, with `count_open`, open connections) are counted under.
    protocol: Protocol
    #: Count admitted connections in polygate_connections; False where the application counts
    #: what a connection becomes (an upgraded MQTT connection counts itself).
    count_open: bool = True
    #: Connections from outside the allowed networks kept open at once so that the
    #: application can answer their request (`AiohttpListener.not_allowed`); 0: closed at once.
    answer_not_allowed: int = 0

    @property
    def state(self) -> GatewayState:
        return self.ctx.state

    @property
    def metrics(self) -> Metrics:
        return self.ctx.metrics

    @property
    def handshake_timeout(self) -> float:
        """Seconds a connection has to deliver complete request headers (and to finish its TLS handshake)."""
        return self.ctx.config.limits.handshake_timeout


class Attachment(TypingProtocol):
    """What serves a connection for longer than one answer (an SSE stream)."""

    def close(self, reason: str) -> None: ...

    def drained(self) -> bool: ...


class WebConnection:
    """One accepted TCP (or TLS) connection of a client listener: what `GatewayState` counts and closes."""

    __slots__ = ("_owner", "transport", "peer", "handler", "admitted", "registered", "attached",
                 "_requests", "_timer")

    #: aiohttp's request handler serving the connection; made only once the connection is kept.
    handler: RequestHandler

    def __init__(self, owner: AiohttpListener, transport: asyncio.Transport, peer: str) -> None:
        self._owner = owner
        self.transport = transport
        self.peer = peer
        #: False: from outside the allowed networks, kept only to be answered (never registered).
        self.admitted = True
        #: Counted in GatewayState (until it closes or is handed over).
        self.registered = False
        #: A stream that holds the connection; `close` and `drained` go to it.
        self.attached: Attachment | None = None
        #: Requests being handled (a WebSocket's upgrade request lasts as long as the WebSocket).
        self._requests = 0
        #: Closes the connection when request headers take longer than limits.handshake_timeout.
        self._timer: asyncio.TimerHandle | None = None

    # -- the request-headers deadline ------------------------------------------------------------

    def arm(self, timeout: float) -> None:
        if self._timer is None and not self._requests:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._headers_timed_out)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_started(self) -> None:
        self._requests += 1
        self.disarm()

    def request_finished(self) -> None:
        self._requests -= 1

    def _headers_timed_out(self) -> None:
        self._timer = None
        if self._requests:
            return
        # Once per connection at most, and a slow-loris flood makes many: debug, never a warning each.
        log.debug("%s: closing the connection from %s: no complete request within the handshake timeout",
                  self._owner.name, self.peer or "an unknown peer")
        self.handler.force_close()

    # -- what GatewayState asks of a connection ----------------------------------------------------

    def close(self, reason: str) -> None:
        """Finish what is being answered (a stream flushes what it holds), then close."""
        if self.attached is not None:
            self.attached.close(reason)
            return
        # As aiohttp's own shutdown: no new request, the current one (if any) ends, then the socket.
        self.handler.close()
        self._owner.spawn_shutdown(self.handler)

    def drained(self) -> bool:
        return self.attached is None or self.attached.drained()


class _AdmittingProtocol(asyncio.Protocol):
    """Admits a listener's connection, then serves it with aiohttp's request handler (module docstring)."""

    __slots__ = ("_owner", "_connection", "_handler", "_timeout")

    def __init__(self, owner: AiohttpListener, handshake_timeout: float) -> None:
        self._owner = owner
        self._connection: WebConnection | None = None
        self._handler: RequestHandler | None = None
        self._timeout = handshake_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        connection = self._owner.admit(transport)  # type: ignore[arg-type]
        if connection is None:
            return
        self._connection = connection
        self._handler = connection.handler
        connection.handler.connection_made(transport)
        connection.arm(self._timeout)

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        if connection is not None:
            # Bytes between requests start the next request's deadline.
            connection.arm(self._timeout)
            connection.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            self._handler.eof_received()
        # As aiohttp's handler: the transport closes itself once the peer stopped sending.
        return None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.handler.connection_lost(exc)
        finally:
            self._owner.release(connection)


class _AdmittingSite(web.SockSite):
    """aiohttp's SockSite, serving its sockets through a protocol factory of ours.

    A TLS listener hands `create_server` no context: `tls_accept` admits the
    connection at its accept and bounds its handshake by limits.handshake_timeout,
    as on every TCP listener, then gives the TLS transport to `factory`'s protocol.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        factory: Callable[[], asyncio.BaseProtocol],
        admission: Admission,
        listener_name: str,
        ssl_context: ssl.SSLContext | None,
        backlog: int,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self._factory = factory
        self._admission = admission
        self._listener_name = listener_name

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner, as SockSite.start does
        factory = self._factory
        if self._ssl_context is not None:
            admission = self._admission
            factory = tls_accepting(admission.ctx, self._listener_name, admission.protocol, self._ssl_context, factory)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)


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
        admission: Admission | None = None,
    ) -> None:
        """`keepalive_timeout`: how long an idle connection is kept between requests
        (None: aiohttp's default); without `admission` also how long a new connection
        may take to send its first request. `admission`: count, cap and time out each
        connection as a client connection (module docstring); None for the health listener."""
        self._app = app
        self._listener = listener
        self._shutdown_timeout = shutdown_timeout
        self._handler_cancellation = handler_cancellation
        self._runner_options: dict[str, Any] = {}
        if keepalive_timeout is not None:
            self._runner_options["keepalive_timeout"] = keepalive_timeout
        self._admission = admission
        #: Open connections by aiohttp's request handler (what `request.protocol` is).
        self._connections: dict[RequestHandler, WebConnection] = {}
        #: Connections from outside the allowed networks, kept to be answered.
        self._not_allowed_open = 0
        if admission is not None:
            # Outermost, so that a request counts as started before any other middleware runs.
            app.middlewares.insert(0, self._requests_middleware())
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._accepting = False
        self._bound: tuple[str, int] | None = None
        self.request_errors = RequestErrorLog(listener.name)

    @property
    def name(self) -> str:
        return self._listener.name

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
            logger=self.request_errors,
            **self._runner_options,
        )
        try:
            await runner.setup()
            admission = self._admission
            site: web.SockSite
            if admission is None:
                site = web.SockSite(runner, sock, ssl_context=ssl_context, backlog=LISTEN_BACKLOG)
            else:
                timeout = admission.handshake_timeout
                site = _AdmittingSite(
                    runner, sock, factory=lambda: _AdmittingProtocol(self, timeout), admission=admission,
                    listener_name=listener.name, ssl_context=ssl_context, backlog=LISTEN_BACKLOG,
                )
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

    # -- client connections (only with an Admission) --------------------------------------------------

    def admit(self, transport: asyncio.Transport) -> WebConnection | None:
        """A newly accepted connection: its WebConnection, or None when it was refused (and closed)."""
        admission = self._admission
        runner = self._runner
        server = runner.server if runner is not None else None
        if admission is None or server is None:
            # A TLS handshake that finished after the listener closed.
            transport.abort()
            return None
        ip, peer = peer_address(transport)
        connection = WebConnection(self, transport, peer)
        listener = self._listener.name
        reason = admission.state.admit(listener, connection, ip, peer)
        if reason is not None:
            admission.metrics.connection_refused(admission.protocol, reason, listener)
            if reason != NOT_ALLOWED or self._not_allowed_open >= admission.answer_not_allowed:
                transport.abort()
                return None
            # Kept to be told why (HTTP 403), never counted: `not_allowed` answers it and closes.
            connection.admitted = False
            self._not_allowed_open += 1
        else:
            connection.registered = True
            if admission.count_open:
                admission.metrics.connection_opened(admission.protocol)
        connection.handler = server()
        self._connections[connection.handler] = connection
        return connection

    def release(self, connection: WebConnection) -> None:
        """The connection closed."""
        connection.disarm()
        self._connections.pop(connection.handler, None)
        if not connection.admitted:
            self._not_allowed_open -= 1
        self._unregister(connection)

    def _unregister(self, connection: WebConnection) -> None:
        admission = self._admission
        if admission is None or not connection.registered:
            return
        connection.registered = False
        admission.state.unregister(self._listener.name, connection)
        if admission.count_open:
            admission.metrics.connection_closed(admission.protocol)

    def connection_of(self, request: web.BaseRequest) -> WebConnection | None:
        """The connection `request` came on (None on a listener without an Admission)."""
        return self._connections.get(request.protocol)  # type: ignore[arg-type]

    def not_allowed(self, request: web.BaseRequest) -> bool:
        """`request` came on a connection from outside the allowed networks (refused and counted already)."""
        connection = self._connections.get(request.protocol)  # type: ignore[arg-type]
        return connection is not None and not connection.admitted

    def hand_over(self, request: web.BaseRequest) -> None:
        """The connection of `request` is counted by what it became from now on (an upgraded MQTT connection).

        Its slot is given back just before the new owner takes one, in the same
        callback, so nothing else can take it in between.
        """
        connection = self._connections.get(request.protocol)  # type: ignore[arg-type]
        if connection is not None:
            self._unregister(connection)

    def spawn_shutdown(self, handler: RequestHandler) -> None:
        """End one connection as aiohttp's shutdown would: its request (if any) may finish first."""
        if self._admission is not None:
            self._admission.state.spawn(handler.shutdown(self._shutdown_timeout), name="http-connection-close")

    def _requests_middleware(self) -> Callable[..., Any]:
        connections = self._connections

        @web.middleware
        async def requests(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
            connection = connections.get(request.protocol)  # type: ignore[arg-type]
            if connection is None:
                return await handler(request)  # type: ignore[no-any-return]
            connection.request_started()
            try:
                return await handler(request)  # type: ignore[no-any-return]
            finally:
                connection.request_finished()

        return requests

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
