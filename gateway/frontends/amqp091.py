"""The AMQP 0.9.1 frontend: a server for real clients (pika, aio-pika) on `asyncio.Protocol`.

Parse (sans-IO framing) -> auth event -> dispatcher -> act on the decision ->
router, as for MQTT. Topics follow RabbitMQ's MQTT convention: a publish to
`amq.topic` with routing key "a.b.c" goes to topic "a/b/c"; a queue bound to
`amq.topic` with binding key "a.*.c" subscribes to "a/+/c" (one SUBSCRIBE
auth event per bind). The default exchange "" puts a message into the queue
named by its routing key; queues are this gateway's own (gateway.amqp091.broker).

Replies, as DESIGN.md asks and clients can tell apart:
- bad credentials: connection.close 403 ACCESS_REFUSED (capability
  authentication_failure_close is advertised, so clients report it as such);
- auth service unavailable (at login, publish or bind): close with 541
  INTERNAL_ERROR and "auth service unavailable" in the reply text — the
  connection at login, the channel later;
- denied publish or bind, another user's queue: channel.close 403;
- another connection's exclusive queue: channel.close 405 RESOURCE_LOCKED;
- a body over limits.max_message_size: channel.close 311 CONTENT_TOO_LARGE;
- a consume or new binding beyond limits.max_subscriptions_per_client:
  channel.close 406 PRECONDITION_FAILED (`_check_subscription_cap` says why);
- SASL EXTERNAL (offered only on TLS with a verified client certificate that
  has an identity) with a response other than empty or that identity, or an
  unoffered mechanism: connection.close 403 ACCESS_REFUSED;
- an exchange other than amq.topic and "": passive declare 404, declare 540
  NOT_IMPLEMENTED (this gateway has exactly those two), publish 404;
- unsupported methods (tx.*, basic.recover-async, exchange.bind, ...):
  channel.close 540, or connection.close 540 on channel 0;
- a broken stream: connection.close 501/502/505, then the socket closes; a
  wrong protocol header is answered with `AMQP 0-9-1` and the socket closes.

The publish hot path runs inside `data_received`: on a decision-cache hit it
costs no task and no await. Only when an answer must be awaited does the
connection start one task that works through the events in arrival order.
Writes are gathered: one transport write per read and per loop turn, with
publisher confirms coalesced into one basic.ack per channel per write.
Deliveries a read causes on other AMQP connections are written when that read
is done, not one loop turn later: a turn costs a poll and a callback, which
for a publisher waiting on each confirm is a large part of a message's cost.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import secrets
from collections.abc import Callable, Coroutine
from typing import Any, cast

from pamqp import commands

from gateway import __version__
from gateway.backpressure import DRAINING
from gateway.amqp091.broker import (
    DEFAULT_EXCHANGE,
    KEY_PREFIX,
    TOPIC_EXCHANGE,
    AMQPMessage,
    Broker,
    Queue,
)
from gateway.amqp091.channel import MAX_UNACKED, Channel
from gateway.amqp091.framing import (
    ACCESS_REFUSED,
    CHANNEL_ERROR,
    COMMAND_INVALID,
    CONNECTION_FORCED,
    CONTENT_TOO_LARGE,
    FRAME_MAX,
    FRAME_MIN_SIZE,
    HEARTBEAT,
    INTERNAL_ERROR,
    NO_ROUTE,
    NOT_ALLOWED,
    NOT_FOUND,
    NOT_IMPLEMENTED,
    PRECONDITION_FAILED,
    PROTOCOL_HEADER,
    REPLY_SUCCESS,
    Ack,
    AMQPError,
    ChannelError,
    ConnectionLevelError,
    ContentTooLarge,
    FrameDecoder,
    FramingError,
    MethodFrame,
    ProtocolHeaderReceived,
    Publish,
    UnknownMethod,
    encode_method,
    encode_return,
    exchange_and_key,
    method_ids,
)
from gateway.amqp091.routing import PublishRoutes, binding_key_to_filter
from gateway.amqp091.sasl import (
    EXTERNAL,
    MECHANISMS,
    MECHANISMS_WITH_EXTERNAL,
    SASLError,
    external_identity,
    parse_response,
)
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.dispatcher import SessionAuth
from gateway.errors import InvalidTopic
from gateway.events import NO_SECRET, Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.frontends.flow import BYPASS, ORDERED, PUBLISH, AckOrder, InboundFlow, Output, ReadPauses, WriteGather, admit
from gateway.frontends.peers import NO_CERTIFICATE, password_refused, peer_address, peer_certificate
from gateway.frontends.tcp_listener import TCPListener
from gateway.queues import REFUSED, STORED, limits_for
from gateway.router import ROUTED
from gateway.store.base import Snapshot

log = logging.getLogger("polygate.amqp091")

#: How long a connection.close waits for close-ok before the socket is dropped.
CLOSE_TIMEOUT = 2.0
#: Proposed in connection.tune; the client's tune-ok decides (0 = none).
HEARTBEAT_INTERVAL = 60
CHANNEL_MAX = 2047
UNAVAILABLE_TEXT = "auth service unavailable, try again later"

_HEADER, _START, _TUNE, _OPEN_WAIT, _OPEN, _CLOSING = range(6)

SERVER_PROPERTIES: dict[str, Any] = {
    "product": "Polygate",
    "version": __version__,
    "platform": f"Python {platform.python_version()}",
    "information": "AMQP 0-9-1 frontend of the Polygate message gateway",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "exchange_exchange_bindings": False,
        "connection.blocked": True,
        "consumer_priorities": False,
        "direct_reply_to": False,
    },
}

#: Acknowledgements never wait behind held publishes: they drain the queues that hold them.
_ACK_METHODS = (commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Reject)

AsyncStep = Coroutine[Any, Any, None]


def _amqp_bool(value: object) -> bool:
    return value is True or value == 1


class AMQP091Connection(asyncio.Protocol):
    """One client connection: handshake, channels, and the per-connection half of the broker."""

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig, broker: Broker, routes: PublishRoutes) -> None:
        self.ctx = ctx
        self.listener = listener
        self.broker = broker
        self._routes = routes
        self._known_routes = routes.known
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        limits = ctx.config.limits
        self._max_topic = limits.max_topic_length
        self._handshake_timeout = limits.handshake_timeout
        #: limits.max_subscriptions_per_client: consumers plus the bindings made on this connection (0 = no cap).
        self._max_subscriptions = limits.max_subscriptions_per_client
        #: amq.topic bindings this connection made (queue, topic filter); some may be gone (see _subscriptions).
        self._bound: set[tuple[Queue, str]] = set()
        #: EXTERNAL was offered in connection.start (a verified certificate with an identity, auth on).
        self._offer_external = False
        self.decoder = FrameDecoder(max_body_size=limits.max_message_size)
        self.peer = ""
        self.certificate = NO_CERTIFICATE
        self.client_id = ""
        self.identity: Identity | None = None
        self.auth: SessionAuth | None = None
        self.channels: dict[int, Channel] = {}
        self.frame_max = FRAME_MAX
        self.channel_max = CHANNEL_MAX
        self.heartbeat = 0
        self.consumer_cancel_notify = False
        self._state = _HEADER
        self._exclusive: list[Queue] = []
        self._output = Output(self.loop, ctx.state.shared("flow.gather", WriteGather), self._before_flush)
        self._confirm_channels: set[Channel] = set()
        #: Publisher confirms in publish order, each once its message is in the store.
        self._confirms = AckOrder(ctx.store, self._confirm)
        self._paused_writing = False
        self._pauses = ReadPauses(lambda: self._closed)
        self._closed = False
        #: The client handles connection.blocked / unblocked (its capability).
        self._blocked_capable = False
        self._registered = False
        self._torn_down = False
        #: Activity since the last heartbeat tick: flags, not clock reads, on the hot path.
        self._received = False
        self._sent = False
        self._silent_ticks = 0
        self._timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._metrics_in = ctx.metrics.messages_in
        self._router = ctx.router
        #: Inbound frames in order, and this connection's side of backpressure.
        self.publisher = InboundFlow(self.loop, self, self._output, self._pauses, ctx.ratelimits.new_message_bucket())
        self._connection_methods: dict[type, Callable[[Any], AsyncStep | None]] = {
            commands.Connection.StartOk: self._on_start_ok,
            commands.Connection.TuneOk: self._on_tune_ok,
            commands.Connection.Open: self._on_open,
            commands.Connection.Close: self._on_connection_close,
            commands.Connection.CloseOk: self._on_connection_close_ok,
        }
        self._channel_methods: dict[type, Callable[[Channel, Any], AsyncStep | None]] = {
            commands.Channel.Close: self._on_channel_close,
            commands.Channel.Flow: self._on_channel_flow,
            commands.Channel.FlowOk: _ignore,
            commands.Exchange.Declare: self._on_exchange_declare,
            commands.Exchange.Delete: self._on_exchange_delete,
            commands.Queue.Declare: self._on_queue_declare,
            commands.Queue.Bind: self._on_queue_bind,
            commands.Queue.Unbind: self._on_queue_unbind,
            commands.Queue.Purge: self._on_queue_purge,
            commands.Queue.Delete: self._on_queue_delete,
            commands.Basic.Qos: self._on_basic_qos,
            commands.Basic.Consume: self._on_basic_consume,
            commands.Basic.Cancel: self._on_basic_cancel,
            commands.Basic.Get: self._on_basic_get,
            commands.Basic.Ack: self._on_basic_ack,
            commands.Basic.Nack: self._on_basic_nack,
            commands.Basic.Reject: self._on_basic_reject,
            commands.Basic.Recover: self._on_basic_recover,
            commands.Confirm.Select: self._on_confirm_select,
        }

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._output.transport = transport
        ip, self.peer = peer_address(transport)
        self.certificate = peer_certificate(transport, self.ctx.config.auth.mtls_identity)
        self._pauses.attach(transport)
        if not admit(self.ctx, self.listener, self, Protocol.AMQP091, ip, self.peer):
            self._closed = True
            transport.abort()
            return
        self._registered = True
        self._timer = self.loop.call_later(self._handshake_timeout, self._on_handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None
        self.publisher.close()
        self._confirms.clear()
        self.broker.alarm_listeners.discard(self._memory_alarm)
        if not self._registered:
            return
        self._registered = False
        self.ctx.state.unregister(self.listener.name, self)
        self.ctx.metrics.connection_closed(Protocol.AMQP091)
        self._teardown()
        if self.auth is not None:
            self.auth.close()
        log.debug("AMQP connection %r from %s closed (%s)", self.client_id, self.peer, exc or "closed")

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for channel in tuple(self.channels.values()):
            channel.refill()
        self._output.flush()

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            try:
                events = self.decoder.feed(data)
            except FramingError as exc:
                # Act on what arrived intact first (e.g. publishes before the garbage).
                if exc.events:
                    self.publisher.feed(exc.events)
                self._framing_error(exc)
                return
            if events:
                self.publisher.feed(events)
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        """The one boundary for our own bugs: logged, and only this connection closes (541)."""
        log.exception("AMQP connection %r from %s failed", self.client_id, self.peer)
        self._connection_error(ConnectionLevelError(INTERNAL_ERROR, "internal error"))
        self._output.flush()

    def eof_received(self) -> bool | None:
        # A half-closed peer sends nothing more: close our side too (also mid-frame).
        return None

    # -- output (ChannelOutput) -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._output.write(data)

    def can_send(self) -> bool:
        return not self._paused_writing and not self._closed

    def confirm_pending(self, channel: Channel) -> None:
        self._confirm_channels.add(channel)
        output = self._output
        if not output.reading and not output.scheduled:
            output.schedule()

    def _confirm(self, item: tuple[Channel, int, bool]) -> None:
        """AckOrder's send: a publish's outcome, in publish order, once what it stored is durable."""
        channel, seq, ok = item
        if not channel.closing:
            channel.confirmed(seq, ok)

    def _before_flush(self) -> None:
        """Publisher confirms go out with the rest; anything written counts as activity (heartbeats)."""
        out = self._output.buffer
        if self._confirm_channels:
            for channel in self._confirm_channels:
                if not channel.closing:
                    frames = channel.confirm_frames()
                    if frames:
                        out.append(frames)
            self._confirm_channels.clear()
        if out:
            self._sent = True

    def _flush(self) -> None:
        self._output.flush()

    # -- closing ----------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close the connection (gateway shutdown): connection.close 320, then the socket."""
        if self._closed or self.transport is None:
            return
        if self._state >= _START and self._state != _CLOSING:
            self.write(encode_method(0, commands.Connection.Close(
                reply_code=CONNECTION_FORCED, reply_text=f"CONNECTION_FORCED - {reason}"[:255], class_id=0, method_id=0)))
        self._drop(reason)

    def _drop(self, reason: str) -> None:
        """Flush what is pending and close the socket."""
        if self._closed:
            return
        self._closed = True
        self._state = _CLOSING
        self._teardown()
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _teardown(self) -> None:
        """Channels end (unacknowledged messages go back), exclusive queues go, holds are released."""
        if self._torn_down:
            return
        self._torn_down = True
        for channel in self.channels.values():
            if not channel.closing:
                channel.shutdown()
        self.channels.clear()
        self.broker.connection_closed(self, self._exclusive)
        self._exclusive.clear()

    def _framing_error(self, exc: FramingError) -> None:
        log.info("closing AMQP connection from %s: %s", self.peer, exc.detail,
                 extra={"event": "protocol_error", "peer": self.peer})
        if exc.bad_header:
            # The spec's answer to a header we do not speak: ours, then close.
            self.write(PROTOCOL_HEADER)
        elif self._state not in (_HEADER, _CLOSING):
            self.write(encode_method(0, commands.Connection.Close(
                reply_code=exc.reply_code, reply_text=exc.reply_text, class_id=0, method_id=0)))
        self._drop(exc.detail)

    def _connection_error(self, exc: AMQPError) -> None:
        """connection.close with the error; the socket closes on close-ok or after CLOSE_TIMEOUT."""
        if self._state == _CLOSING or self._closed:
            return
        if exc.reply_code in (ACCESS_REFUSED, INTERNAL_ERROR) and self._state <= _START:
            log.debug("AMQP login from %s refused: %s", self.peer, exc.detail)
        else:
            log.info("closing AMQP connection %r from %s: %s", self.client_id, self.peer, exc.reply_text,
                     extra={"event": "protocol_error", "peer": self.peer})
        for channel in self.channels.values():
            if channel in self._confirm_channels:
                frames = channel.confirm_frames()
                if frames:
                    self._output.buffer.append(frames)
        self.write(encode_method(0, commands.Connection.Close(
            reply_code=exc.reply_code, reply_text=exc.reply_text, class_id=exc.class_id, method_id=exc.method_id)))
        self._state = _CLOSING
        self._teardown()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_timer = self.loop.call_later(CLOSE_TIMEOUT, self._drop, "no connection.close-ok")

    def _channel_error(self, number: int, exc: ChannelError) -> None:
        """channel.close with the error; the channel's frames are ignored until close-ok."""
        channel = self.channels.get(number)
        if channel is None or channel.closing:
            return
        log.info("closing channel %d of AMQP connection %r: %s", number, self.client_id, exc.reply_text,
                 extra={"event": "channel_error", "peer": self.peer})
        # Publishes handled before the failing one are confirmed first.
        frames = channel.confirm_frames()
        if frames:
            self._output.buffer.append(frames)
        channel.shutdown()
        self.write(encode_method(number, commands.Channel.Close(
            reply_code=exc.reply_code, reply_text=exc.reply_text, class_id=exc.class_id, method_id=exc.method_id)))

    def _fail(self, number: int, exc: AMQPError) -> None:
        if isinstance(exc, ChannelError) and number in self.channels:
            self._channel_error(number, exc)
        else:
            self._connection_error(exc)

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if self._state != _OPEN and not self._closed:
            log.info("AMQP connection from %s: no connection.open within %gs (limits.handshake_timeout)", self.peer,
                     self._handshake_timeout, extra={"event": "protocol_error", "peer": self.peer})
            self._drop("handshake timeout")

    def _heartbeat_tick(self) -> None:
        """Every half heartbeat interval: drop a peer silent for two intervals, and send a
        heartbeat when we sent nothing since the last tick."""
        interval = self.heartbeat
        # While we do not read, the peer's heartbeats wait in the socket, not lost.
        if self._received or self._pauses:
            self._received = False
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
            if self._silent_ticks >= 4:
                self._timer = None
                log.info("AMQP connection %r from %s: no heartbeat for %gs", self.client_id, self.peer,
                         2 * interval, extra={"event": "heartbeat_timeout", "peer": self.peer})
                self._drop("missed heartbeats")
                return
        if not self._sent:
            self._output.buffer.append(HEARTBEAT)
            self._flush()
        self._sent = False
        self._timer = self.loop.call_later(interval / 2, self._heartbeat_tick)

    # -- event processing ---------------------------------------------------------------------------

    def event_kind(self, event: object) -> int:
        kind = type(event)
        if kind is Publish:
            return PUBLISH
        # Acknowledgements never wait behind held publishes: they drain the queues that hold them.
        if kind is Ack or (kind is MethodFrame and type(event.method) in _ACK_METHODS):  # type: ignore[attr-defined]
            return BYPASS
        return ORDERED

    #: The inbound flow's hot path: a publish goes straight to `publish`.
    publish_type = Publish

    def publish(self, event: Publish) -> AsyncStep | None:
        return self._publish(event)

    def handle(self, event: object) -> AsyncStep | None:
        kind = type(event)
        if kind is Publish:
            return self._publish(event)  # type: ignore[arg-type]
        if kind is Ack:
            self._ack(event)  # type: ignore[arg-type]
            return None
        return self._handle(event)

    def flow_error(self, event: object, exc: Exception) -> None:
        if isinstance(exc, AMQPError):
            self._fail(getattr(event, "channel", 0), exc)
        else:
            log.error("AMQP connection %r from %s failed", self.client_id, self.peer, exc_info=exc)
            self._connection_error(ConnectionLevelError(INTERNAL_ERROR, "internal error"))
            self._output.flush()

    def publisher_name(self) -> str:
        return repr(self.client_id or self.peer)

    def drain(self) -> None:
        """The gateway stops: publishes from now on wait (unconfirmed); acknowledgements still flow."""
        self.publisher.hold(DRAINING)

    def drained(self) -> bool:
        """Everything this connection's consumers were sent is acknowledged, or kept in the store."""
        for channel in self.channels.values():
            if any(not seq for _, _, _, seq in channel.unacked.values()):
                return False
            if any(not consumer.queue.drained() for consumer in channel.consumers.values()):
                return False
        return True

    def _memory_alarm(self, on: bool) -> None:
        """connection.blocked / unblocked for clients that asked for them (RabbitMQ's memory alarm)."""
        if self._state != _OPEN or self._closed:
            return
        if on:
            self.write(encode_method(0, commands.Connection.Blocked(reason="low on memory: queued messages")))
        else:
            self.write(encode_method(0, commands.Connection.Unblocked()))

    # -- routing events to handlers -------------------------------------------------------------------

    def _handle(self, event: object) -> AsyncStep | None:
        kind = type(event)
        if kind is MethodFrame:
            return self._method(event.channel, event.method)  # type: ignore[attr-defined]
        if kind is ProtocolHeaderReceived:
            self._send_start()
            return None
        if self._state == _CLOSING:
            return None
        if kind is UnknownMethod:
            number = event.channel  # type: ignore[attr-defined]
            class_id, method_id = event.class_id, event.method_id  # type: ignore[attr-defined]
            detail = f"method {class_id}.{method_id} is not implemented"
            channel = self.channels.get(number) if self._state == _OPEN else None
            if channel is None:
                raise ConnectionLevelError(NOT_IMPLEMENTED, detail, class_id=class_id, method_id=method_id)
            if channel.closing:
                return None
            raise ChannelError(NOT_IMPLEMENTED, detail, class_id=class_id, method_id=method_id)
        if kind is ContentTooLarge:
            if self._channel(event.channel) is None:  # type: ignore[attr-defined]
                return None
            self.ctx.metrics.dropped(Protocol.AMQP091, "too_large")
            raise ChannelError(
                CONTENT_TOO_LARGE,
                f"message body of {event.body_size} bytes exceeds limits.max_message_size "  # type: ignore[attr-defined]
                f"({self.decoder.max_body_size})",
                class_id=60, method_id=40,
            )
        raise ConnectionLevelError(COMMAND_INVALID, f"unexpected {kind.__name__}")  # pragma: no cover

    def _channel(self, number: int) -> Channel | None:
        """The open channel for a channel-level frame; None when it is closing (ignore the frame)."""
        if number == 0:
            raise ConnectionLevelError(COMMAND_INVALID, "channel 0 carries only connection methods")
        if self._state != _OPEN:
            raise ConnectionLevelError(COMMAND_INVALID, "channel frames before connection.open")
        channel = self.channels.get(number)
        if channel is None:
            raise ConnectionLevelError(CHANNEL_ERROR, f"expected 'channel.open' on channel {number}")
        return None if channel.closing else channel

    def _method(self, number: int, method: Any) -> AsyncStep | None:
        kind = type(method)
        class_id, method_id = method_ids(method)
        if number == 0:
            if self._state == _CLOSING and kind not in (commands.Connection.Close, commands.Connection.CloseOk):
                return None
            handler = self._connection_methods.get(kind)
            if handler is None:
                if class_id == 10:
                    raise ConnectionLevelError(NOT_IMPLEMENTED, f"{method.name} is not implemented",
                                               class_id=class_id, method_id=method_id)
                raise ConnectionLevelError(COMMAND_INVALID, f"{method.name} on channel 0",
                                           class_id=class_id, method_id=method_id)
            return handler(method)
        if self._state == _CLOSING:
            return None
        if class_id == 10:
            raise ConnectionLevelError(COMMAND_INVALID, f"{method.name} on channel {number}",
                                       class_id=class_id, method_id=method_id)
        if kind is commands.Channel.Open:
            self._on_channel_open(number)
            return None
        channel = self.channels.get(number)
        if self._state != _OPEN:
            raise ConnectionLevelError(COMMAND_INVALID, "channel frames before connection.open",
                                       class_id=class_id, method_id=method_id)
        if channel is None:
            raise ConnectionLevelError(CHANNEL_ERROR, f"expected 'channel.open' on channel {number}",
                                       class_id=class_id, method_id=method_id)
        if channel.closing:
            if kind is commands.Channel.CloseOk or kind is commands.Channel.Close:
                if kind is commands.Channel.Close:
                    self.write(encode_method(number, commands.Channel.CloseOk()))
                del self.channels[number]
            return None
        handler2 = self._channel_methods.get(kind)
        if handler2 is None:
            raise ChannelError(NOT_IMPLEMENTED, f"{method.name} is not implemented", class_id=class_id,
                               method_id=method_id)
        try:
            return handler2(channel, method)
        except ChannelError as exc:
            if not exc.class_id:
                exc.class_id, exc.method_id = class_id, method_id
            raise

    # -- connection class --------------------------------------------------------------------------------

    def _send_start(self) -> None:
        self._state = _START
        # EXTERNAL only where it can succeed: never on plaintext, nor without a verified
        # certificate that has an identity (RabbitMQ offers it on any TLS socket and then
        # refuses; not offering it keeps a client's choice among the others).
        self._offer_external = bool(self.certificate.identity) and self.ctx.dispatcher.requires_auth(Protocol.AMQP091)
        self.write(encode_method(0, commands.Connection.Start(
            version_major=0, version_minor=9, server_properties=SERVER_PROPERTIES,
            mechanisms=MECHANISMS_WITH_EXTERNAL if self._offer_external else MECHANISMS, locales="en_US")))

    def _on_start_ok(self, method: commands.Connection.StartOk) -> AsyncStep | None:
        if self._state != _START:
            raise ConnectionLevelError(COMMAND_INVALID, "unexpected connection.start-ok", class_id=10, method_id=11)
        return self._authenticate(method)

    async def _authenticate(self, method: commands.Connection.StartOk) -> None:
        mechanism = method.mechanism or ""
        username: str
        secret: Secret
        try:
            if mechanism == EXTERNAL and self._offer_external:
                # The certificate is the credential: no username (a provider maps the
                # identity to its user, DESIGN.md "Transport security"), no password.
                external_identity(method.response or b"", self.certificate.identity)
                username, secret = "", NO_SECRET
            else:
                username, secret = parse_response(mechanism, method.response or b"")
        except SASLError as exc:
            raise ConnectionLevelError(ACCESS_REFUSED, str(exc), class_id=10, method_id=11) from None
        properties = method.client_properties if isinstance(method.client_properties, dict) else {}
        capabilities = properties.get("capabilities")
        if isinstance(capabilities, dict):
            self.consumer_cancel_notify = _amqp_bool(capabilities.get("consumer_cancel_notify"))
            self._blocked_capable = _amqp_bool(capabilities.get("connection.blocked"))
        name = properties.get("connection_name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        self.client_id = name if isinstance(name, str) and name else f"amqp091:{self.peer}"
        event = AuthEvent(
            protocol=Protocol.AMQP091,
            action=Action.CONNECT,
            client_id=self.client_id,
            username=username,
            secret=secret,
            peer=self.peer,
            tls_identity=self.certificate.identity,
            tls_serial=self.certificate.serial,
            tls_fingerprint=self.certificate.fingerprint,
        )
        decision = password_refused(self.ctx.config.auth, self.listener, secret) or await self.ctx.dispatcher.decide(event)
        if self._closed:
            return
        if decision.outcome is Outcome.UNAVAILABLE:
            raise ConnectionLevelError(INTERNAL_ERROR, UNAVAILABLE_TEXT, class_id=10, method_id=11)
        if decision.outcome is not Outcome.ALLOW or decision.identity is None:
            raise ConnectionLevelError(
                ACCESS_REFUSED, f"Login was refused using authentication mechanism {method.mechanism}",
                class_id=10, method_id=11)
        self.identity = decision.identity
        self.auth = self.ctx.dispatcher.session(event, decision.identity)
        self._state = _TUNE
        self.write(encode_method(0, commands.Connection.Tune(
            channel_max=CHANNEL_MAX, frame_max=FRAME_MAX, heartbeat=HEARTBEAT_INTERVAL)))
        log.debug("AMQP client %r logged in from %s as %r", self.client_id, self.peer, decision.identity.external_id)

    def _on_tune_ok(self, method: commands.Connection.TuneOk) -> None:
        if self._state != _TUNE:
            raise ConnectionLevelError(COMMAND_INVALID, "unexpected connection.tune-ok", class_id=10, method_id=31)
        frame_max = method.frame_max or FRAME_MAX
        if frame_max < FRAME_MIN_SIZE:
            raise ConnectionLevelError(NOT_ALLOWED, f"frame_max {frame_max} is below {FRAME_MIN_SIZE}",
                                       class_id=10, method_id=31)
        self.frame_max = min(frame_max, FRAME_MAX)
        self.decoder.frame_max = self.frame_max
        self.channel_max = min(method.channel_max or CHANNEL_MAX, CHANNEL_MAX)
        self.heartbeat = method.heartbeat or 0
        self._state = _OPEN_WAIT

    def _on_open(self, method: commands.Connection.Open) -> None:
        if self._state != _OPEN_WAIT:
            raise ConnectionLevelError(COMMAND_INVALID, "unexpected connection.open", class_id=10, method_id=40)
        # One topic space: every virtual host name reaches it.
        self._state = _OPEN
        self.write(encode_method(0, commands.Connection.OpenOk()))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.heartbeat:
            self._timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)
        if self._blocked_capable:
            self.broker.alarm_listeners.add(self._memory_alarm)
            if self.broker.budget.alarm:
                self._memory_alarm(True)

    def _on_connection_close(self, method: commands.Connection.Close) -> None:
        if method.reply_code and method.reply_code != REPLY_SUCCESS:
            # The client's own text, quoted: it may hold line breaks meant to forge log lines.
            log.info("AMQP client %r closed its connection: %s %r", self.client_id, method.reply_code,
                     method.reply_text)
        self._teardown()
        self.write(encode_method(0, commands.Connection.CloseOk()))
        self._drop("client closed the connection")

    def _on_connection_close_ok(self, method: commands.Connection.CloseOk) -> None:
        if self._state != _CLOSING:
            raise ConnectionLevelError(COMMAND_INVALID, "connection.close-ok without connection.close",
                                       class_id=10, method_id=51)
        self._drop("connection closed")

    # -- channel class ----------------------------------------------------------------------------------

    def _on_channel_open(self, number: int) -> None:
        if self._state != _OPEN:
            raise ConnectionLevelError(COMMAND_INVALID, "channel.open before connection.open", class_id=20, method_id=10)
        if number > self.channel_max:
            raise ConnectionLevelError(CHANNEL_ERROR, f"channel {number} is above channel_max {self.channel_max}",
                                       class_id=20, method_id=10)
        if number in self.channels:
            raise ConnectionLevelError(CHANNEL_ERROR, f"second 'channel.open' on channel {number}",
                                       class_id=20, method_id=10)
        self.channels[number] = Channel(number, self, self.broker, self.ctx.metrics)
        self.write(encode_method(number, commands.Channel.OpenOk()))

    def _on_channel_close(self, channel: Channel, method: commands.Channel.Close) -> None:
        frames = channel.confirm_frames()
        if frames:
            self._output.buffer.append(frames)
        channel.shutdown()
        del self.channels[channel.number]
        self.write(encode_method(channel.number, commands.Channel.CloseOk()))

    def _on_channel_flow(self, channel: Channel, method: commands.Channel.Flow) -> None:
        channel.flow = bool(method.active)
        self.write(encode_method(channel.number, commands.Channel.FlowOk(active=channel.flow)))
        if channel.flow:
            channel.refill()

    # -- exchange class -----------------------------------------------------------------------------------

    def _on_exchange_declare(self, channel: Channel, method: commands.Exchange.Declare) -> None:
        name = method.exchange or ""
        if name == TOPIC_EXCHANGE:
            if not method.passive and method.exchange_type != "topic":
                raise ChannelError(PRECONDITION_FAILED, f"inequivalent arg 'type' for exchange '{name}': "
                                   f"received '{method.exchange_type}' but current is 'topic'")
        elif name == DEFAULT_EXCHANGE:
            if not method.passive:
                raise ChannelError(ACCESS_REFUSED, "operation not permitted on the default exchange")
        elif method.passive:
            raise ChannelError(NOT_FOUND, f"no exchange '{name}'")
        else:
            raise ChannelError(NOT_IMPLEMENTED, f"cannot declare exchange '{name}': this gateway has only "
                               "'amq.topic' and the default exchange")
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Exchange.DeclareOk()))

    def _on_exchange_delete(self, channel: Channel, method: commands.Exchange.Delete) -> None:
        name = method.exchange or ""
        if name in (TOPIC_EXCHANGE, DEFAULT_EXCHANGE):
            raise ChannelError(ACCESS_REFUSED, f"exchange '{name}' cannot be deleted")
        raise ChannelError(NOT_FOUND, f"no exchange '{name}'")

    # -- queue class ----------------------------------------------------------------------------------------

    def _queue_name(self, channel: Channel, name: str | None) -> str:
        """"" names the channel's last declared queue (spec)."""
        if name:
            return name
        if not channel.last_queue:
            raise ChannelError(NOT_FOUND, "no queue named and none declared on this channel")
        return channel.last_queue

    def _find(self, channel: Channel, name: str | None) -> Queue:
        assert self.identity is not None
        return self.broker.find(self._queue_name(channel, name), self.identity, self)

    def _on_queue_declare(self, channel: Channel, method: commands.Queue.Declare) -> None:
        assert self.identity is not None
        name = method.queue or ""
        if method.passive and not name:
            name = self._queue_name(channel, name)
        existed = name in self.broker.queues
        arguments = method.arguments if isinstance(method.arguments, dict) else {}
        queue = self.broker.declare(
            name, identity=self.identity, connection=self, passive=bool(method.passive),
            durable=bool(method.durable), exclusive=bool(method.exclusive), auto_delete=bool(method.auto_delete),
            arguments=arguments)
        if queue.exclusive and not existed:
            exclusive = self._exclusive
            if len(exclusive) % 64 == 63:
                # Deleted ones go now and then: declaring and deleting in a loop must not grow the list.
                exclusive[:] = [q for q in exclusive if not q.deleted]
            exclusive.append(queue)
        channel.last_queue = queue.name
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Queue.DeclareOk(
                queue=queue.name, message_count=len(queue.ready), consumer_count=len(queue.consumers))))

    def _bind_target(self, channel: Channel, exchange: str | None, queue_name: str | None) -> Queue:
        exchange = exchange or ""
        if exchange == DEFAULT_EXCHANGE:
            raise ChannelError(ACCESS_REFUSED, "operation not permitted on the default exchange")
        if exchange != TOPIC_EXCHANGE:
            raise ChannelError(NOT_FOUND, f"no exchange '{exchange}'")
        return self._find(channel, queue_name)

    def _on_queue_bind(self, channel: Channel, method: commands.Queue.Bind) -> AsyncStep | None:
        queue = self._bind_target(channel, method.exchange, method.queue)
        try:
            topic_filter = binding_key_to_filter(method.routing_key or "", self._max_topic)
        except InvalidTopic as exc:
            raise ChannelError(PRECONDITION_FAILED, str(exc)) from None
        if topic_filter in queue.bindings:
            if not method.nowait:
                self.write(encode_method(channel.number, commands.Queue.BindOk()))
            return None
        self._check_subscription_cap(queue)
        return self._bind(channel, queue, topic_filter, bool(method.nowait))

    async def _bind(self, channel: Channel, queue: Queue, topic_filter: str, nowait: bool) -> None:
        assert self.auth is not None
        decision = await self.auth.subscribe(topic_filter)
        if self._closed or channel.closing:
            return
        self._check(decision, f"subscribe to topic filter {topic_filter!r}", class_id=50, method_id=20)
        if queue.deleted:
            raise ChannelError(NOT_FOUND, f"no queue '{queue.name}'", class_id=50, method_id=20)
        self.broker.bind(queue, topic_filter, decision.exclusions)
        if self._max_subscriptions:
            # Never more than the cap: one is added only below it, stale ones counting until pruned.
            self._bound.add((queue, topic_filter))
        if not nowait:
            self.write(encode_method(channel.number, commands.Queue.BindOk()))

    def _on_queue_unbind(self, channel: Channel, method: commands.Queue.Unbind) -> None:
        queue = self._bind_target(channel, method.exchange, method.queue)
        try:
            topic_filter = binding_key_to_filter(method.routing_key or "", self._max_topic)
        except InvalidTopic:
            topic_filter = ""  # never bound, so nothing to remove
        if topic_filter:
            self.broker.unbind(queue, topic_filter)
            self._bound.discard((queue, topic_filter))
        self.write(encode_method(channel.number, commands.Queue.UnbindOk()))

    def _on_queue_purge(self, channel: Channel, method: commands.Queue.Purge) -> None:
        count = self._find(channel, method.queue).purge()
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Queue.PurgeOk(message_count=count)))

    def _on_queue_delete(self, channel: Channel, method: commands.Queue.Delete) -> None:
        assert self.identity is not None
        name = self._queue_name(channel, method.queue)
        queue = self.broker.queues.get(name)
        count = 0
        if queue is not None:
            self.broker.check_access(queue, self.identity, self)
            if method.if_unused and queue.consumers:
                raise ChannelError(PRECONDITION_FAILED, f"queue '{name}' in use")
            if method.if_empty and queue.ready:
                raise ChannelError(PRECONDITION_FAILED, f"queue '{name}' not empty")
            count = self.broker.delete(queue)
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Queue.DeleteOk(message_count=count)))

    # -- limits.max_subscriptions_per_client --------------------------------------------------------------------

    def _subscriptions(self) -> int:
        """Consumers on this connection's channels plus the amq.topic bindings it made that still exist."""
        bound = self._bound
        # A binding leaves with its queue or with an unbind from another connection: forget those.
        gone = [entry for entry in bound if entry[0].deleted or entry[1] not in entry[0].bindings]
        bound.difference_update(gone)
        return len(bound) + sum(len(channel.consumers) for channel in self.channels.values())

    def _check_subscription_cap(self, queue: Queue | None) -> None:
        """Refuse a consume (queue None) or a new binding of `queue` beyond limits.max_subscriptions_per_client.

        The answer is channel.close 406 PRECONDITION_FAILED: a soft error, so
        only this channel closes and the consumers and bindings on the
        connection's other channels keep working, as MQTT keeps the filters a
        client holds when it answers 0x80 for one more. (RabbitMQ's
        consumer_max_per_channel closes the whole connection with 530
        NOT_ALLOWED; 406 is also what this gateway answers at its
        queues-per-owner cap.) A queue's bindings outlive the connection that
        made them, so a queue is capped too: otherwise reconnecting would let
        one queue collect any number of router subscriptions.
        """
        cap = self._max_subscriptions
        if not cap:
            return
        if queue is not None and len(queue.bindings) >= cap:
            detail = f"queue '{queue.name}' has {cap} bindings (limits.max_subscriptions_per_client)"
        else:
            # Stale bindings are only looked for at the cap: below it the count is an upper bound.
            held = len(self._bound) + sum(len(channel.consumers) for channel in self.channels.values())
            if held < cap or self._subscriptions() < cap:
                return
            detail = f"this connection holds {cap} consumers and bindings (limits.max_subscriptions_per_client)"
        self.ctx.state.note_refused(self.listener.name, "max_subscriptions_per_client", self.peer)
        raise ChannelError(PRECONDITION_FAILED, detail)

    # -- basic class ------------------------------------------------------------------------------------------

    def _on_basic_qos(self, channel: Channel, method: commands.Basic.Qos) -> None:
        if method.prefetch_size:
            raise ChannelError(NOT_IMPLEMENTED, "prefetch_size is not supported; use prefetch_count")
        count = method.prefetch_count or 0
        if method.global_:
            channel.unacked_limit = min(count, MAX_UNACKED) if count else MAX_UNACKED
        else:
            channel.prefetch_count = count
        self.write(encode_method(channel.number, commands.Basic.QosOk()))
        channel.refill()

    def _on_basic_consume(self, channel: Channel, method: commands.Basic.Consume) -> None:
        queue = self._find(channel, method.queue)
        tag = method.consumer_tag or f"amq.ctag-{secrets.token_urlsafe(16)}"
        if tag in channel.consumers:
            raise ConnectionLevelError(NOT_ALLOWED, f"attempt to reuse consumer tag '{tag}'", class_id=60, method_id=20)
        if queue.has_exclusive_consumer():
            raise ChannelError(ACCESS_REFUSED, f"queue '{queue.name}' in exclusive use")
        if method.exclusive and queue.consumers:
            raise ChannelError(ACCESS_REFUSED, f"cannot obtain exclusive access to queue '{queue.name}': it has consumers")
        self._check_subscription_cap(None)
        # consume-ok goes out before the first delivery, which may follow at once.
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Basic.ConsumeOk(consumer_tag=tag)))
        channel.consume(queue, tag, no_ack=bool(method.no_ack), exclusive=bool(method.exclusive))

    def _on_basic_cancel(self, channel: Channel, method: commands.Basic.Cancel) -> None:
        tag = method.consumer_tag or ""
        channel.cancel(tag)
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Basic.CancelOk(consumer_tag=tag)))

    def _on_basic_get(self, channel: Channel, method: commands.Basic.Get) -> None:
        channel.get(self._find(channel, method.queue), bool(method.no_ack))

    def _ack(self, event: Ack) -> None:
        channel = self.channels.get(event.channel)
        if channel is None or channel.closing or self._state != _OPEN:
            if self._state == _CLOSING:
                return
            channel = self._channel(event.channel)
        if channel is not None:
            try:
                channel.ack(event.delivery_tag, event.multiple)
            except ChannelError as exc:
                exc.class_id, exc.method_id = 60, 80
                raise

    def _on_basic_ack(self, channel: Channel, method: commands.Basic.Ack) -> None:
        channel.ack(method.delivery_tag or 0, bool(method.multiple))

    def _on_basic_nack(self, channel: Channel, method: commands.Basic.Nack) -> None:
        channel.nack(method.delivery_tag or 0, bool(method.multiple), bool(method.requeue))

    def _on_basic_reject(self, channel: Channel, method: commands.Basic.Reject) -> None:
        channel.nack(method.delivery_tag or 0, False, bool(method.requeue))

    def _on_basic_recover(self, channel: Channel, method: commands.Basic.Recover) -> None:
        if not method.requeue:
            raise ChannelError(NOT_IMPLEMENTED, "basic.recover with requeue=false is not supported")
        channel.recover()
        self.write(encode_method(channel.number, commands.Basic.RecoverOk()))

    def _on_confirm_select(self, channel: Channel, method: commands.Confirm.Select) -> None:
        channel.confirm = True
        if not method.nowait:
            self.write(encode_method(channel.number, commands.Confirm.SelectOk()))

    # -- publishing ----------------------------------------------------------------------------------------------

    def _check(self, decision: Decision, what: str, *, class_id: int, method_id: int) -> None:
        if decision.outcome is Outcome.ALLOW:
            return
        if decision.outcome is Outcome.UNAVAILABLE:
            raise ChannelError(INTERNAL_ERROR, UNAVAILABLE_TEXT, class_id=class_id, method_id=method_id)
        raise ChannelError(ACCESS_REFUSED, f"{what} denied", class_id=class_id, method_id=method_id)

    def _publish(self, event: Publish) -> AsyncStep | None:
        """The hot path. Returns a step to await when the decision is not at hand."""
        channel = self.channels.get(event.channel)
        if channel is None or channel.closing or self._state != _OPEN:
            if self._state == _CLOSING:
                return None
            channel = self._channel(event.channel)  # raises unless the channel is closing
            if channel is None:
                return None
        if channel.confirm:
            channel.publish_seq += 1
        if event.immediate:
            raise ChannelError(NOT_IMPLEMENTED, "immediate=true is not supported", class_id=60, method_id=40)
        exchange = event.exchange
        if exchange == TOPIC_EXCHANGE:
            route = self._known_routes.get(event.routing_key)
            if route is None:
                try:
                    route = self._routes.learn(event.routing_key)
                except InvalidTopic as exc:
                    log.debug("publish from %r with routing key %r: %s", self.client_id, event.routing_key, exc)
                    self.ctx.metrics.dropped(Protocol.AMQP091, "invalid_topic")
                    self._unroutable(channel, event)
                    return None
            assert self.auth is not None
            decision = self.auth.publish_now(route[0])
            if decision is None:
                return self._publish_awaited(channel, event, route)
            self._route(channel, event, route, decision)
            return None
        if exchange == DEFAULT_EXCHANGE:
            self._publish_to_queue(channel, event)
            return None
        raise ChannelError(NOT_FOUND, f"no exchange '{exchange}'", class_id=60, method_id=40)

    async def _publish_awaited(self, channel: Channel, event: Publish, route: tuple[str, bytes]) -> None:
        assert self.auth is not None
        decision = await self.auth.publish(route[0])
        if not self._closed and not channel.closing:
            self._route(channel, event, route, decision)

    def _route(self, channel: Channel, event: Publish, route: tuple[str, bytes], decision: Decision) -> None:
        """Hand an amq.topic publish to the router; `route` is (topic, encoded exchange and key)."""
        topic, exchange_key = route
        if decision.outcome is not Outcome.ALLOW:
            self.ctx.metrics.dropped(
                Protocol.AMQP091, "auth_unavailable" if decision.outcome is Outcome.UNAVAILABLE else "denied")
            self._check(decision, f"publish to topic {topic!r}", class_id=60, method_id=40)
        self._metrics_in[Protocol.AMQP091] += 1
        message = AMQPMessage(topic, event.body, 1 if event.persistent else 0, exchange_key=exchange_key,
                              properties=event.properties)
        status = self._router.publish(message, self.publisher)
        if not status & ROUTED and event.mandatory:
            self._unroutable(channel, event)
        elif channel.confirm:
            self._confirm_publish(channel, status)
        elif status & REFUSED:
            self.ctx.metrics.messages_refused[Protocol.AMQP091] += 1

    def _publish_to_queue(self, channel: Channel, event: Publish) -> None:
        assert self.identity is not None
        broker = self.broker
        queue = broker.queues.get(event.routing_key)
        if queue is None:
            self._unroutable(channel, event)
            return
        broker.check_access(queue, self.identity, self, publish=True)
        self._metrics_in[Protocol.AMQP091] += 1
        message = AMQPMessage(event.routing_key, event.body, 1 if event.persistent else 0,
                              exchange_key=exchange_and_key(DEFAULT_EXCHANGE, event.routing_key),
                              properties=event.properties)
        status = queue.put(message, self.publisher)
        if channel.confirm:
            self._confirm_publish(channel, status)
        elif status & REFUSED:
            self.ctx.metrics.messages_refused[Protocol.AMQP091] += 1

    def _confirm_publish(self, channel: Channel, status: int) -> None:
        """basic.ack once every queue holds the message (in the store for a durable one); basic.nack
        when a full queue refused it."""
        ok = not status & REFUSED
        if not ok:
            self.ctx.metrics.messages_refused[Protocol.AMQP091] += 1
        confirms = self._confirms
        stored = bool(status & STORED)
        if ok and not stored and not confirms.waiting:
            channel.confirmed(channel.publish_seq)
        else:
            confirms.ack((channel, channel.publish_seq, ok), stored)

    def _unroutable(self, channel: Channel, event: Publish) -> None:
        """Nothing took the message: basic.return when mandatory (before its confirm)."""
        if event.mandatory:
            self.write(encode_return(channel.number, NO_ROUTE, "NO_ROUTE",
                                     exchange_and_key(event.exchange, event.routing_key), event.properties,
                                     event.body, self.frame_max))
        if channel.confirm:
            self._confirm_publish(channel, 0)


def _ignore(channel: Channel, method: Any) -> None:
    return None


class AMQP091Frontend(TCPListener):
    """One AMQP 0.9.1 listener (plain or TLS)."""

    protocol = Protocol.AMQP091

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None:
        super().__init__(ctx, listener)
        self.broker = shared_broker(ctx)
        self.routes: PublishRoutes = ctx.state.shared(
            "amqp091.routes", lambda: PublishRoutes(ctx.config.limits.max_topic_length))

    @staticmethod
    def prepare(ctx: FrontendContext, snapshot: Snapshot) -> None:
        """Before any listener opens: the durable queues the store kept."""
        shared_broker(ctx).restore(snapshot.queues_of(KEY_PREFIX))

    def connection_factory(self) -> Callable[[], AMQP091Connection]:
        ctx, listener, broker, routes = self.ctx, self.listener, self.broker, self.routes
        return lambda: AMQP091Connection(ctx, listener, broker, routes)


def shared_broker(ctx: FrontendContext) -> Broker:
    """The gateway's one set of AMQP 0.9.1 queues, shared by its AMQP 0.9.1 listeners."""
    return ctx.state.shared("amqp091.broker", lambda: Broker(
        router=ctx.router,
        metrics=ctx.metrics,
        limits=limits_for(ctx.config.limits, Protocol.AMQP091),
        check_owners=ctx.dispatcher.requires_auth(Protocol.AMQP091),
        store=ctx.store,
    ))
