"""MQTT over WebSocket: the TCP broker's session code behind a WebSocket.

An aiohttp listener accepts the upgrade on `listener.path` with subprotocol
`mqtt` (or the older `mqttv3.1`) and hands the connection to the very
`MQTTConnection` the TCP listener uses, through `WebSocketTransport`: an
`asyncio.Transport` whose bytes travel in binary WebSocket frames. Sessions,
auth, takeover, limits and backpressure are therefore the TCP ones, and both
listeners share one session registry (a client may take its session over from
TCP to WebSocket and back).

MQTT packets need not align with frames (MQTT 3.1.1 section 6): incoming
frames are fed to the packet decoder as a byte stream. Per connection there
is one reader loop (the request's task) and one long-lived writer task that
sends what accumulated since its last send as one frame; no task per message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.frontends.aiohttp_listener import Admission, AiohttpListener
from gateway.frontends.mqtt import MQTTConnection, session_registry
from gateway.frontends.peers import peer_address
from gateway.mqtt.session import SessionRegistry

log = logging.getLogger("polygate.websocket")

#: Offered subprotocols, preferred first ("mqttv3.1" is what MQTT 3.1 clients send).
SUBPROTOCOLS = ("mqtt", "mqttv3.1")
#: Used when a listener gives no path (the config's own default is the same).
DEFAULT_PATH = "/mqtt"
#: Frames are joined up to about this size: few enough frames for speed, small
#: enough for clients with a per-message cap (the `websockets` library's is 1 MiB).
FRAME_BYTES = 64 * 1024
#: A client may put small packets (acks, pings) in the same frame as a
#: maximal PUBLISH; a frame larger than that is refused with 1009.
FRAME_SLACK = 64 * 1024
#: Bytes waiting for the socket above which the session stops sending (as asyncio's default).
WRITE_HIGH_WATER = 64 * 1024
#: How long a closing handshake may wait for the peer's close frame.
CLOSE_TIMEOUT = 5.0

_NO_SUBPROTOCOL = b"offer the WebSocket subprotocol mqtt"
_TEXT_FRAME = b"MQTT over WebSocket uses binary frames"


class WebSocketTransport(asyncio.Transport):
    """One upgraded WebSocket presented as the `asyncio.Transport` a protocol expects.

    `write` only queues bytes; the writer task sends them. Past the high-water
    mark the protocol's `pause_writing` is called, and `resume_writing` once the
    socket has taken the backlog down to the low-water mark, exactly as an
    asyncio socket transport does, so a slow WebSocket reader holds back
    its publishers the way a slow TCP reader does.
    """

    __slots__ = (
        "_ws", "_socket", "_protocol", "_loop", "_shutting_down", "_pending", "_pending_size",
        "_high_water", "_low_water", "_writing_paused", "_reading_paused", "_wakeup", "_resumed",
        "_closing", "_aborted", "_close_code", "_close_message", "_writer",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        socket_transport: asyncio.Transport,
        protocol: asyncio.Protocol,
        *,
        shutting_down: Callable[[], bool],
    ) -> None:
        super().__init__()
        self._ws = ws
        self._socket = socket_transport
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self._shutting_down = shutting_down
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._high_water = WRITE_HIGH_WATER
        self._low_water = WRITE_HIGH_WATER // 4
        self._writing_paused = False
        self._reading_paused = False
        #: Set while the writer waits for bytes; the reader's while it is paused.
        self._wakeup: asyncio.Future[None] | None = None
        self._resumed: asyncio.Future[None] | None = None
        self._closing = False
        self._aborted = False
        self._close_code: int = WSCloseCode.OK
        self._close_message = b""
        self._writer: asyncio.Task[None] | None = None

    # -- the asyncio.Transport surface ---------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # peername, sockname, ssl_object, ...: the underlying TCP (or TLS) connection's.
        return self._socket.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        chunk = data if data.__class__ is bytes else bytes(data)
        self._pending.append(chunk)  # type: ignore[arg-type]
        self._pending_size += len(chunk)
        _wake(self._wakeup)
        if not self._writing_paused and self._pending_size > self._high_water:
            self._writing_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        if not self._writing_paused and self._pending_size > high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            _wake(self._resumed)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def close(self) -> None:
        """Send what is queued, then the close frame (1001 when the gateway is stopping)."""
        self._begin_close(WSCloseCode.GOING_AWAY if self._shutting_down() else WSCloseCode.OK, b"")

    def abort(self) -> None:
        """Drop the connection now: nothing queued is sent, no closing handshake."""
        self._closing = self._aborted = True
        self._pending.clear()
        self._pending_size = 0
        self._socket.abort()
        _wake(self._wakeup)
        _wake(self._resumed)

    def _begin_close(self, code: int, message: bytes) -> None:
        if self._closing:
            return
        self._closing = True
        self._close_code, self._close_message = code, message
        _wake(self._wakeup)
        _wake(self._resumed)

    # -- running the connection ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends; the protocol's `connection_lost` is called once."""
        protocol = self._protocol
        protocol.connection_made(self)
        lost: BaseException | None = None
        try:
            if not self._aborted:
                self._writer = self._loop.create_task(self._write_loop(), name="websocket-writer")
                await self._read_loop()
        except asyncio.CancelledError:
            # The peer went away (handler cancellation) or the listener is closing.
            lost = ConnectionResetError("connection lost")
            raise
        except Exception as exc:
            lost = exc
            raise
        finally:
            self._closing = True
            writer = self._writer
            try:
                if writer is not None and not writer.done() and lost is None:
                    # Let a closing handshake we started finish (bounded by CLOSE_TIMEOUT).
                    _wake(self._wakeup)
                    await asyncio.wait((writer,), timeout=CLOSE_TIMEOUT + 1.0)
            finally:
                # Also when the wait is cancelled: aiohttp cancels this task as soon
                # as the socket closes, which the closing handshake itself causes.
                if writer is not None and not writer.done():
                    writer.cancel()
                protocol.connection_lost(lost)

    async def _read_loop(self) -> None:
        ws = self._ws
        protocol = self._protocol
        while True:
            if self._reading_paused and not self._closing:
                # Frames stay in aiohttp's bounded buffer, which then stops reading the socket.
                self._resumed = self._loop.create_future()
                try:
                    await self._resumed
                finally:
                    self._resumed = None
                continue
            message = await ws.receive()
            kind = message.type
            if kind is WSMsgType.BINARY:
                if not self._closing:
                    try:
                        protocol.data_received(message.data)
                    except Exception:
                        # As asyncio does for a failing protocol: log it and drop the connection.
                        log.exception("MQTT over WebSocket connection failed; dropping it")
                        self.abort()
            elif kind is WSMsgType.TEXT:
                self._refuse(WSCloseCode.UNSUPPORTED_DATA, _TEXT_FRAME, "a text frame")
            elif kind is WSMsgType.ERROR:
                # aiohttp has already closed with the matching code (1009 too large, 1002 bad frame).
                log.info("closing MQTT over WebSocket connection from %s: %s",
                         _peer(self._socket), message.data, extra={"event": "protocol_error"})
                return
            else:
                # CLOSE (answered by aiohttp), CLOSING (our own close) or CLOSED.
                return

    def _refuse(self, code: int, message: bytes, what: str) -> None:
        if self._closing:
            return
        log.info("closing MQTT over WebSocket connection from %s: it sent %s (%d)",
                 _peer(self._socket), what, code, extra={"event": "protocol_error"})
        self._begin_close(code, message)

    async def _write_loop(self) -> None:
        ws = self._ws
        pending = self._pending
        try:
            while True:
                if pending:
                    # Awaiting the send is the socket's backpressure: meanwhile bytes gather.
                    await ws.send_bytes(self._next_frame())
                    if self._writing_paused and self._pending_size <= self._low_water:
                        self._writing_paused = False
                        self._protocol.resume_writing()
                    continue
                if self._closing:
                    break
                self._wakeup = self._loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
            if not self._aborted:
                await ws.close(code=self._close_code, message=self._close_message)
        except ConnectionError:
            # The peer is gone; the reader sees the end of the stream and finishes up.
            self._closing = True
            pending.clear()
            self._pending_size = 0
        except Exception:
            # A writer that cannot send must not leave a half-working connection behind.
            log.exception("sending on the WebSocket from %s failed; dropping the connection", _peer(self._socket))
            self.abort()

    def _next_frame(self) -> bytes:
        """What is queued, joined into one frame of about FRAME_BYTES (chunks are never split)."""
        pending = self._pending
        first = pending.popleft()
        size = len(first)
        if size >= FRAME_BYTES or not pending:
            self._pending_size -= size
            return first
        parts = [first]
        while pending and size < FRAME_BYTES:
            chunk = pending.popleft()
            parts.append(chunk)
            size += len(chunk)
        self._pending_size -= size
        return b"".join(parts)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


#: The headers aiohttp's handshake reads (and quotes when one is wrong).
_HANDSHAKE_HEADERS = ("Upgrade", "Connection", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol",
                      "Sec-WebSocket-Extensions", "Origin")


def _valid_handshake(request: web.Request) -> bool:
    """Handshake headers are ASCII, and a key, when present, is 16 bytes in base64.

    An absent key is aiohttp's to answer (a plain GET gets 426).
    """
    headers = request.headers
    if not all(value.isascii() for name in _HANDSHAKE_HEADERS for value in headers.getall(name, ())):
        return False
    key = headers.get("Sec-WebSocket-Key", "")
    if not key:
        return True
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, binascii.Error):
        return False


def _peer(transport: asyncio.BaseTransport) -> str:
    return peer_address(transport)[1] or "an unknown peer"


class WebSocketFrontend:
    """One MQTT-over-WebSocket listener (plain or TLS)."""

    protocol = Protocol.MQTT

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None:
        self._ctx = ctx
        self._listener = listener
        self._registry: SessionRegistry = session_registry(ctx)
        self._path = listener.path or DEFAULT_PATH
        limits = ctx.config.limits
        # The largest packet the MQTT decoder accepts, plus what may share its frame.
        self._max_frame = limits.max_message_size + limits.max_topic_length + 16 + FRAME_SLACK
        # Only upgrade requests arrive here: no request body is ever read.
        app = web.Application(client_max_size=4096)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        # Cancelling the request's task when its client goes away ends the
        # connection even while its reading is paused. Each TCP connection is
        # admitted (and counted) from its accept; once upgraded, its MQTTConnection
        # takes its slot over (`hand_over`) and counts it as an MQTT connection.
        # The upgrade request must be complete within limits.handshake_timeout,
        # then MQTTConnection's CONNECT timeout and keepalive take over; a
        # connection left idle after a non-upgrade answer is closed as soon.
        self._server = AiohttpListener(
            app,
            listener,
            shutdown_timeout=ctx.config.server.shutdown_timeout,
            handler_cancellation=True,
            keepalive_timeout=limits.handshake_timeout,
            admission=Admission(ctx=ctx, protocol=Protocol.MQTT, count_open=False),
        )

    async def start(self) -> None:
        self._ctx.state.set_limit(self._listener.name, self._listener.max_connections, self._listener.allowed_cidrs)
        await self._server.start()

    @property
    def bound(self) -> tuple[str, int]:
        return self._server.bound

    async def stop_accepting(self) -> None:
        await self._server.stop_accepting()

    async def aclose(self) -> None:
        await self._server.aclose()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != self._path:
            return web.Response(status=404, text=f"not found: MQTT over WebSocket is served at {self._path}\n")
        if request.method != "GET":
            return web.Response(status=405, headers={"Allow": "GET"}, text="use GET with a WebSocket upgrade\n")
        ws = web.WebSocketResponse(
            protocols=SUBPROTOCOLS,
            max_msg_size=self._max_frame,
            # Compression costs CPU per message and invites decompression bombs.
            compress=False,
            timeout=CLOSE_TIMEOUT,
        )
        if not _valid_handshake(request):
            # aiohttp's own checks let a non-ASCII key escape as a ValueError, and
            # echo a bad header into an error text it cannot encode: both a 500.
            return web.Response(status=400, text="malformed WebSocket handshake headers\n")
        if not ws.can_prepare(request):
            return web.Response(
                status=426,
                headers={"Upgrade": "websocket", "Connection": "Upgrade"},
                text=f"{self._path} speaks MQTT over WebSocket: connect with a WebSocket client, subprotocol mqtt\n",
            )
        await ws.prepare(request)
        socket_transport = request.transport
        if socket_transport is None:
            return ws
        if ws.ws_protocol is None:
            self._ctx.metrics.connection_refused(Protocol.MQTT, "no_subprotocol")
            log.info("refused MQTT over WebSocket connection from %s: no mqtt subprotocol offered",
                     _peer(socket_transport), extra={"event": "connection_refused"})
            await ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=_NO_SUBPROTOCOL)
            return ws
        connection = MQTTConnection(self._ctx, self._listener, self._registry)
        state = self._ctx.state
        transport = WebSocketTransport(
            ws, socket_transport, connection, shutting_down=lambda: state.shutting_down
        )
        # No await between the hand-over and `run`, whose first step is
        # MQTTConnection.connection_made admitting the connection again.
        self._server.hand_over(request)
        await transport.run()
        return ws
