"""TLS listeners accept plain TCP and start TLS themselves, after the connection limits.

Handing the context to `create_server` hides three things a hostile network
needs seen: a socket still in its handshake counts against no limit, a failed
handshake is dropped without a word (asyncio and uvloop log it only in debug
mode: an `ssl.SSLError` is an `OSError`), and a handshake may take 60 s. Here a
TLS connection is admitted (per-IP cap, listener cap, descriptor budget,
allowed networks) when it is accepted, its handshake is bounded by
`limits.handshake_timeout`, and a failure is counted in
`polygate_connections_refused{reason="tls_handshake"}` and logged once per
interval with the peer and OpenSSL's reason. Then the frontend's protocol
takes the TLS transport as if `create_server` had made it: `connection_made`
first, then the bytes that came with the client's Finished.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Callable
from typing import Any, cast

from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.frontends.peers import peer_address

#: `reason` label of a failed handshake in polygate_connections_refused.
TLS_HANDSHAKE = "tls_handshake"


def handshake_failure(exc: BaseException) -> str:
    """What went wrong, for the log: OpenSSL's reason, or what happened to the socket. Never a secret."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {(exc.reason or exc.__class__.__name__).lower().replace('_', ' ')}"
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "TLS handshake not complete within limits.handshake_timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "TLS handshake failed: the client closed the connection"
    return f"TLS handshake failed: {exc.__class__.__name__}"


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> type[Any]:
    """The loop's own TLS protocol, the one its `create_server(ssl=...)` uses."""
    try:
        import uvloop
    except ImportError:
        pass
    else:
        if isinstance(loop, uvloop.Loop):
            return uvloop.loop.SSLProtocol  # type: ignore[attr-defined,no-any-return]
    return asyncio.sslproto.SSLProtocol


class _Handover(asyncio.Protocol):
    """What the TLS layer first takes for the application: at the end of the handshake it puts the real one in.

    The TLS layer calls `connection_made` before it delivers a byte, on both loops,
    so the frontend's protocol sees what `create_server(ssl=...)` would show it.
    """

    __slots__ = ("_accept",)

    def __init__(self, accept: TLSAccept) -> None:
        self._accept = accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accept.handed_over(cast(asyncio.Transport, transport))


#: Bytes one TLS read decrypts into at most: what the TLS layers ask SSLObject.read for.
READ_BUFFER_SIZE = 262144


class _DecryptedInto(asyncio.BufferedProtocol):
    """Lets the TLS layer decrypt into one buffer per listener, for a protocol that takes `data_received`.

    Given a plain protocol, the TLS layer (asyncio's and uvloop's alike) asks
    `SSLObject.read` for up to 256 KiB per read: CPython allocates that much for
    every read and shrinks it, and glibc serves each with mmap, mremap and
    munmap. With small messages that was the largest cost of a message over
    TLS (bench tls). Read into a buffer instead, and hand the protocol a copy of
    just what arrived. The buffer is shared by a listener's connections: all
    run on one loop, and each read is copied out before the next begins.
    """

    __slots__ = ("_app", "_buffer", "_data_received")

    def __init__(self, app: asyncio.Protocol, buffer: memoryview) -> None:
        self._app = app
        self._buffer = buffer
        self._data_received = app.data_received

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return self._app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()


class TLSAccept(asyncio.Protocol):
    """The protocol of one accepted TCP connection on a TLS listener, until its handshake is done."""

    def __init__(
        self,
        ctx: FrontendContext,
        listener_name: str,
        protocol: Protocol,
        context: ssl.SSLContext,
        app_factory: Callable[[], asyncio.BaseProtocol],
        read_buffer: memoryview,
    ) -> None:
        self._ctx = ctx
        self._read_buffer = read_buffer
        self._listener = listener_name
        self._protocol = protocol
        self._context = context
        self._app_factory = app_factory
        self._raw: asyncio.Transport | None = None
        self._peer = ""
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        raw = cast(asyncio.Transport, transport)
        self._raw = raw
        ip, self._peer = peer_address(raw)
        reason = self._ctx.state.admit(self._listener, self, ip, self._peer)
        if reason is not None:
            self._ctx.metrics.connection_refused(self._protocol, reason, self._listener)
            raw.abort()
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        # What create_server(ssl=...) does when it accepts, done here after the admission, and
        # synchronously: the loop starts reading when this returns, and the TLS layer must get the
        # ClientHello (a task would start a loop iteration later, after uvloop's first read).
        tls = _ssl_protocol_class(loop)(
            loop, _Handover(self), self._context, waiter, server_side=True,
            ssl_handshake_timeout=self._ctx.config.limits.handshake_timeout,
        )
        raw.set_protocol(tls)
        tls.connection_made(raw)

    def close(self, reason: str) -> None:
        """Shutdown, or a limit: a connection still in its handshake has nothing to say goodbye with."""
        if self._raw is not None:
            self._raw.abort()
        self._release()

    def handed_over(self, tls: asyncio.Transport) -> None:
        """The handshake is done: the frontend's protocol takes the TLS transport and admits it itself."""
        self._release()
        app = self._app_factory()
        if isinstance(app, asyncio.Protocol):
            tls.set_protocol(_DecryptedInto(app, self._read_buffer))
        else:
            tls.set_protocol(app)
        app.connection_made(tls)

    def _handshake_done(self, waiter: asyncio.Future[None]) -> None:
        exc = None if waiter.cancelled() else waiter.exception()
        if exc is None:
            return
        if self._raw is not None:
            self._raw.abort()
        self._release()
        self._ctx.metrics.connection_refused(self._protocol, TLS_HANDSHAKE, self._listener)
        self._ctx.state.note_refused(self._listener, handshake_failure(exc), self._peer or "an unknown peer")

    def _release(self) -> None:
        if self._admitted:
            self._admitted = False
            self._ctx.state.unregister(self._listener, self)


def tls_accepting(
    ctx: FrontendContext,
    listener_name: str,
    protocol: Protocol,
    context: ssl.SSLContext,
    app_factory: Callable[[], asyncio.BaseProtocol],
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of a TLS listener: `create_server` gets it, and no `ssl=`."""
    read_buffer = memoryview(bytearray(READ_BUFFER_SIZE))
    return lambda: TLSAccept(ctx, listener_name, protocol, context, app_factory, read_buffer)
