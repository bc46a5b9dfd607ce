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
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config_types import ListenerConfig
from gateway.frontends.tcp_listener import LISTEN_BACKLOG
from gateway.frontends.tls import server_ssl_context
from gateway.logging_setup import LogThrottle

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
        self._runner_options: dict[str, Any] = {}
        if keepalive_timeout is not None:
            self._runner_options["keepalive_timeout"] = keepalive_timeout
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._accepting = False
        self._bound: tuple[str, int] | None = None
        self.request_errors = RequestErrorLog(listener.name)

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
