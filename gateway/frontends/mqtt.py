"""The MQTT 3.1.1 frontend: a broker session loop on `asyncio.Protocol`.

Parse (sans-IO codec) -> auth event -> dispatcher -> act on the decision ->
router. The publish hot path runs inside `data_received`: on a decision-cache
hit (or the provider's in-memory answer) it costs no task and no await. Only
when an answer must be awaited does the connection start one task that works
through the packets in arrival order, so a slow auth call stalls only its own
client. Writes are gathered: one transport write per read and per loop turn.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

from gateway.backpressure import DRAINING, NO_PUBLISHER
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.errors import InvalidTopic
from gateway.events import Action, AuthEvent, Decision, Outcome, Protocol, Secret
from gateway.frontends.flow import (
    BYPASS,
    ORDERED,
    PUBLISH,
    SEQUENCED,
    AckOrder,
    InboundFlow,
    Output,
    ReadPauses,
    WriteGather,
    admit,
)
from gateway.frontends.peers import password_refused, peer_address, peer_identity
from gateway.frontends.tcp_listener import TCPListener
from gateway.mqtt.codec import (
    PINGRESP_BYTES,
    MQTTDecoder,
    encode_connack,
    encode_puback,
    encode_pubcomp,
    encode_packet_id,
    encode_publish_head,
    encode_pubrec,
    encode_pubrel,
    encode_suback,
    encode_unsuback,
)
from gateway.mqtt.packets import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_USERNAME_OR_PASSWORD,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    SUBACK_FAILURE,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
)
from gateway.mqtt.session import KEY_PREFIX, Session, SessionRegistry
from gateway.dispatcher import SessionAuth
from gateway.message import Message
from gateway.queues import STORED, limits_for
from gateway.store.base import Snapshot
from gateway.topics import validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.mqtt")

_ALLOW = Outcome.ALLOW


def _connack_code(decision: Decision, connect: Connect) -> int:
    if decision.outcome is Outcome.ALLOW:
        return CONNACK_ACCEPTED
    if decision.outcome is Outcome.UNAVAILABLE:
        return CONNACK_SERVER_UNAVAILABLE
    # A client that presented no credentials at all is "not authorized"
    # (anonymous access is off); presented credentials were wrong.
    if connect.username is None and connect.password is None:
        return CONNACK_NOT_AUTHORIZED
    return CONNACK_BAD_USERNAME_OR_PASSWORD


class _SharedHead:
    """The PUBLISH head (fixed header and topic) last encoded, kept for the next one alike.

    A head depends only on the topic, the payload's length and the flags, so
    it is shared by every subscriber of one message and, since publishers
    mostly repeat a topic and a size, by the next messages too. Topics are
    compared by identity: the decoder hands out one str per repeated topic.
    One per gateway (its connections share one event loop, so no locking).
    """

    __slots__ = ("topic", "size", "variant", "head")

    def __init__(self) -> None:
        self.topic = ""
        self.size = -1
        self.variant = -1
        self.head = b""


class MQTTConnection(asyncio.Protocol):
    __slots__ = (
        "ctx", "listener", "registry", "loop", "transport", "decoder", "peer", "tls_identity",
        "session", "auth", "connect", "will", "publisher", "_output", "_buf", "_acks", "_paused",
        "_closing", "_clean_disconnect", "_last_rx", "_keepalive_handle",
        "_metrics_out", "_metrics_in", "_max_payload", "_max_topic", "_deny_disconnect",
        "_registered", "_taken_over", "_pauses", "_received", "_sent",
        "_router", "_shared_head", "_subscribe_bucket",
    )

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig, registry: SessionRegistry) -> None:
        self.ctx = ctx
        self.listener = listener
        self.registry = registry
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        limits = ctx.config.limits
        self._max_payload = limits.max_message_size
        self._max_topic = limits.max_topic_length
        # A packet may carry the payload, the topic and a few bytes of header.
        self.decoder = MQTTDecoder(max_packet_size=limits.max_message_size + limits.max_topic_length + 16)
        self.peer = ""
        self.tls_identity = ""
        self.session: Session | None = None
        self.auth: SessionAuth | None = None
        self.connect: Connect | None = None
        self.will: Message | None = None
        self._output = Output(self.loop, ctx.state.shared("flow.gather", WriteGather), self._count_messages)
        #: The output buffer, appended to directly on the delivery hot path.
        self._buf = self._output.buffer
        #: PUBACK/PUBREC in arrival order, each once its message is in the store.
        self._acks = AckOrder(ctx.store, self._output.write)
        self._paused = False
        self._closing = False
        self._clean_disconnect = False
        self._last_rx = 0.0
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._metrics_out = ctx.metrics.messages_out
        self._metrics_in = ctx.metrics.messages_in
        # Messages received and sent since the last flush: plain ints per message,
        # added to the metrics dicts once per flush (each dict bump hashes an enum).
        self._received = 0
        self._sent = 0
        self._router = ctx.router
        self._shared_head = ctx.state.shared("mqtt.publish_head", _SharedHead)
        self._deny_disconnect = ctx.config.auth.deny_publish_action == "disconnect"
        self._registered = False
        self._taken_over = False
        #: Why reading is paused ("backlog", "ratelimit"); reading resumes when empty.
        self._pauses = ReadPauses(lambda: self._closing)
        #: Inbound packets in order, and this connection's side of backpressure.
        self.publisher = InboundFlow(self.loop, self, self._output, self._pauses, ctx.ratelimits.new_message_bucket())
        self._subscribe_bucket = ctx.ratelimits.new_subscribe_bucket()

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._output.transport = transport
        ip, self.peer = peer_address(transport)
        self.tls_identity = peer_identity(transport, self.ctx.config.auth.mtls_identity)
        self._pauses.attach(transport)
        if not admit(self.ctx, self.listener, self, Protocol.MQTT, ip, self.peer):
            transport.abort()
            return
        self._registered = True
        self._last_rx = self.loop.time()
        self._keepalive_handle = self.loop.call_later(self.ctx.config.limits.handshake_timeout, self._connect_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self.publisher.close()
        self._acks.clear()
        self._count_messages()
        if not self._registered:
            return
        self._registered = False
        ctx = self.ctx
        ctx.state.unregister(self.listener.name, self)
        ctx.metrics.connection_closed(Protocol.MQTT)
        session = self.session
        if session is None:
            return
        session.detach(self)
        client_id = session.client_id
        registry = self.registry
        if registry.owners.get(client_id) is self:
            del registry.owners[client_id]
        if self.will is not None and not self._clean_disconnect and not ctx.state.shutting_down:
            ctx.state.spawn(self._publish_will(self.will), name=f"mqtt-will-{client_id}")
        self.will = None
        if self.auth is not None and not self._taken_over:
            self.auth.close()
        if not self._taken_over:
            if session.clean:
                registry.discard(session)
            else:
                registry.disconnected(session)
        log.debug("client %r disconnected (%s)", client_id, "clean" if self._clean_disconnect else exc or "closed")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self.session is not None and self.session.queue:
            self.session.pump()
            self._output.flush()

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        try:
            packets = self.decoder.packets(data)
        except MQTTProtocolError as exc:
            # Act on what arrived intact first (e.g. a PUBLISH before the garbage).
            self.publisher.feed(list(exc.decoded))
            self._protocol_error(str(exc), exc.connack_code)
            return
        if packets:
            self.publisher.feed(packets)

    # -- the inbound flow (FlowHandler) ---------------------------------------------------------

    def event_kind(self, packet: object) -> int:
        kind = type(packet)
        if kind is Publish:
            return PUBLISH
        if self.session is not None:
            # Acknowledgements and pings never wait behind held PUBLISHes: they are
            # what drains the queues that hold them (no deadlock between two clients).
            if kind is Puback or kind is Pubrec or kind is Pubcomp or kind is Pingreq:
                return BYPASS
            if kind is Pubrel:
                return SEQUENCED
        return ORDERED

    #: The inbound flow's hot path: a PUBLISH goes straight to `publish`.
    publish_type = Publish

    def publish(self, packet: Publish) -> Awaitable[None] | None:
        if self.session is None:
            self._protocol_error("expected CONNECT, got Publish")
            return None
        return self._publish(packet)

    def handle(self, packet: object) -> Awaitable[None] | None:
        kind = type(packet)
        session = self.session
        if kind is Publish:
            if session is None:
                self._protocol_error("expected CONNECT, got Publish")
                return None
            return self._publish(packet)  # type: ignore[arg-type]
        if session is None:
            if kind is Connect and self.connect is None:
                return self._handle_connect(packet)  # type: ignore[arg-type]
            self._protocol_error(f"expected CONNECT, got {kind.__name__}")
            return None
        if kind is Puback:
            session.puback(packet.packet_id)  # type: ignore[attr-defined]
        elif kind is Pubrel:
            session.incoming_qos2.discard(packet.packet_id)  # type: ignore[attr-defined]
            self._ack(encode_pubcomp(packet.packet_id), False)  # type: ignore[attr-defined]
        elif kind is Pubrec:
            if session.pubrec(packet.packet_id):  # type: ignore[attr-defined]
                self._output.write(encode_pubrel(packet.packet_id))  # type: ignore[attr-defined]
        elif kind is Pubcomp:
            session.pubcomp(packet.packet_id)  # type: ignore[attr-defined]
        elif kind is Pingreq:
            self._output.write(PINGRESP_BYTES)
        elif kind is Subscribe:
            return self._handle_subscribe(packet)  # type: ignore[arg-type]
        elif kind is Unsubscribe:
            for topic_filter in packet.topics:  # type: ignore[attr-defined]
                session.unsubscribe(self._router, topic_filter)
            self._output.write(encode_unsuback(packet.packet_id))  # type: ignore[attr-defined]
        elif kind is Disconnect:
            self._clean_disconnect = True
            self.will = None
            self.close("client disconnected")
        elif kind is Connect:
            self._protocol_error("second CONNECT on one connection (MQTT-3.1.0-2)")
        else:
            self._protocol_error(f"unexpected {kind.__name__} from a client")
        return None

    def flow_error(self, packet: object, exc: Exception) -> None:
        log.error("MQTT connection from %s failed on %s", self.peer, type(packet).__name__, exc_info=exc)
        self.close("internal error")

    def publisher_name(self) -> str:
        return repr(self.session.client_id if self.session is not None else self.peer)

    def drain(self) -> None:
        """The gateway stops: publishes from now on wait (unacknowledged); acknowledgements still flow."""
        self.publisher.hold(DRAINING)

    def drained(self) -> bool:
        return self.session is None or self.session.drained()

    # -- output --------------------------------------------------------------------------------

    def _ack(self, data: bytes, stored: bool) -> None:
        """An acknowledgement of a client's packet, in order behind those waiting for the store."""
        acks = self._acks
        if stored or acks.waiting:
            acks.ack(data, stored)
        else:
            self._output.write(data)

    def _count_messages(self) -> None:
        """Add the messages received and sent since the last call to the gateway's metrics."""
        if self._received:
            self._metrics_in[Protocol.MQTT] += self._received
            self._received = 0
        if self._sent:
            self._metrics_out[Protocol.MQTT] += self._sent
            self._sent = 0

    def can_send(self) -> bool:
        return not self._paused and not self._closing

    def send_publish(self, message: Message, qos: int, retain: bool, dup: bool, packet_id: int | None) -> None:
        # Head, packet id and payload go out as they are, joined once per flush:
        # the payload is never copied into a packet of its own.
        shared = self._shared_head
        topic = message.topic
        payload = message.payload
        size = len(payload)
        variant = qos | (4 if retain else 0) | (8 if dup else 0)
        if shared.topic is topic and shared.size == size and shared.variant == variant:
            head = shared.head
        else:
            head = encode_publish_head(topic, size, qos, retain, dup)
            shared.topic = topic
            shared.size = size
            shared.variant = variant
            shared.head = head
        output = self._output
        if not output.reading and not output.scheduled:
            output.schedule()
        buf = self._buf
        buf.append(head)
        if packet_id is not None:
            buf.append(encode_packet_id(packet_id))
        buf.append(payload)
        self._sent += 1

    def send_pubrel(self, packet_id: int) -> None:
        self._output.write(encode_pubrel(packet_id))

    # -- closing --------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close the connection (shutdown, takeover, deny): flush what is pending first."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self._output.flush()
        self.transport.close()

    def _protocol_error(self, message: str, connack_code: int | None = None) -> None:
        log.info("closing MQTT connection from %s: %s", self.peer, message,
                 extra={"event": "protocol_error", "peer": self.peer})
        if connack_code is not None and self.connect is None:
            self._output.write(encode_connack(False, connack_code))
        self.close(message)

    def _connect_timeout(self) -> None:
        self._keepalive_handle = None
        if self.connect is None:
            self._protocol_error(f"no CONNECT within {self.ctx.config.limits.handshake_timeout:g}s")

    def _keepalive_check(self, interval: float) -> None:
        idle = self.loop.time() - self._last_rx
        if idle >= interval:
            self._keepalive_handle = None
            self._protocol_error(f"keepalive expired ({idle:.1f}s without a packet)")
            return
        self._keepalive_handle = self.loop.call_later(interval - idle, self._keepalive_check, interval)

    # -- CONNECT ----------------------------------------------------------------------------------

    async def _handle_connect(self, connect: Connect) -> None:
        ctx = self.ctx
        self.connect = connect
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        client_id = connect.client_id
        if not client_id:
            if not connect.clean_session:
                # MQTT-3.1.3-8: a zero-length id needs a clean session.
                self._output.write(encode_connack(False, CONNACK_IDENTIFIER_REJECTED))
                self.close("zero-length client id without clean session")
                return
            client_id = f"auto-{uuid.uuid4().hex}"
        will: Message | None = None
        if connect.will is not None:
            try:
                validate_topic_name(connect.will.topic, self._max_topic)
            except InvalidTopic as exc:
                self._protocol_error(f"invalid will topic: {exc}")
                return
            will = Message(connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain)
        event = AuthEvent(
            protocol=Protocol.MQTT,
            action=Action.CONNECT,
            client_id=client_id,
            username=connect.username or "",
            secret=Secret(connect.password or b""),
            peer=self.peer,
            tls_identity=self.tls_identity,
        )
        refused = password_refused(ctx.config.auth, self.listener, event.secret)
        decision = refused or await ctx.dispatcher.decide(event)
        if self._closing:
            return
        # 0x05 as Mosquitto answers every refusal: the password may be right, this listener does not take it.
        code = CONNACK_NOT_AUTHORIZED if refused else _connack_code(decision, connect)
        if code != CONNACK_ACCEPTED or decision.identity is None:
            self._output.write(encode_connack(False, code or CONNACK_NOT_AUTHORIZED))
            self.close(f"CONNECT refused ({code})")
            return
        identity = decision.identity
        registry = self.registry
        previous = registry.owners.get(client_id)
        if isinstance(previous, MQTTConnection) and previous is not self:
            # Session takeover (MQTT-3.1.4-2): the older connection goes.
            previous._taken_over = True
            previous.close("session taken over by a new connection")
            if previous.session is not None:
                previous.session.detach(previous)
            if previous.will is not None and not previous._clean_disconnect:
                ctx.state.spawn(previous._publish_will(previous.will), name=f"mqtt-will-{client_id}")
                previous.will = None
        registry.owners[client_id] = self
        session = registry.sessions.get(client_id)
        session_present = False
        if session is not None and (connect.clean_session or session.identity.external_id != identity.external_id):
            # A clean start, or a different identity: never hand one user's session to another.
            registry.discard(session)
            session = None
        if session is None:
            session = registry.create(client_id, clean=connect.clean_session, identity=identity)
        else:
            session_present = True
            registry.connected(session)
        self.session = session
        self.auth = ctx.dispatcher.session(event, identity)
        self.will = will
        self._output.write(encode_connack(session_present, CONNACK_ACCEPTED))
        session.attach(self)
        if connect.keepalive:
            interval = connect.keepalive * 1.5
            self._keepalive_handle = self.loop.call_later(interval, self._keepalive_check, interval)
        log.debug("client %r connected from %s as %r", client_id, self.peer, identity.external_id)

    # -- PUBLISH ----------------------------------------------------------------------------------

    def _publish(self, packet: Publish) -> Awaitable[None] | None:
        """The hot path. An awaitable when the decision must be awaited."""
        session = self.session
        assert session is not None and self.auth is not None
        if packet.qos == 2 and packet.packet_id in session.incoming_qos2:
            # A retransmission of a QoS 2 message already routed: acknowledge only.
            self._ack(encode_pubrec(packet.packet_id), False)  # type: ignore[arg-type]
            return None
        topic = packet.topic
        # The codec already refuses wildcards and NUL; an empty or overlong name is
        # ours to refuse. A name can only be overlong in UTF-8 bytes when it has more
        # than a quarter as many characters, so short names skip the byte count.
        if not topic or len(topic) * 4 > self._max_topic:
            try:
                validate_topic_name(topic, self._max_topic)
            except InvalidTopic as exc:
                self._protocol_error(f"invalid topic in PUBLISH: {exc}")
                return None
        decision = self.auth.publish_now(topic)
        if decision is None:
            return self._publish_awaited(packet)
        self._act_on_publish(packet, decision)
        return None

    async def _publish_awaited(self, packet: Publish) -> None:
        assert self.auth is not None
        decision = await self.auth.publish(packet.topic)
        if not self._closing:
            self._act_on_publish(packet, decision)

    def _act_on_publish(self, packet: Publish, decision: Decision) -> None:
        qos = packet.qos
        self._received += 1
        outcome = decision.outcome
        status = 0
        if outcome is _ALLOW:
            payload = packet.payload
            if len(payload) > self._max_payload:
                self.ctx.metrics.dropped(Protocol.MQTT, "too_large")
                log.warning("dropped PUBLISH from %r: payload of %d bytes exceeds limits.max_message_size",
                            self.session.client_id if self.session else "", len(payload))
            else:
                publisher = self.publisher
                # MQTT 3.1.1 cannot tell a QoS 1/2 publisher "refused": a full
                # reject_new queue holds it back instead of losing what is acknowledged.
                publisher.refusable = qos == 0
                # A Publish is a Message: routed as it is, no copy of its fields.
                status = self._router.publish(packet, publisher)
        elif outcome is Outcome.UNAVAILABLE:
            self.ctx.metrics.dropped(Protocol.MQTT, "auth_unavailable")
            if qos:
                # Not acknowledged: the client still owns the message and resends it
                # (with DUP) after reconnecting, once auth answers again.
                self.close("auth service unavailable")
                return
        else:
            self.ctx.metrics.dropped(Protocol.MQTT, "denied")
            if self._deny_disconnect:
                self.close("publish denied")
                return
        if qos == 1:
            acks = self._acks
            if status & STORED or acks.waiting:
                acks.ack(encode_puback(packet.packet_id), bool(status & STORED))  # type: ignore[arg-type]
            else:
                output = self._output
                output.buffer.append(encode_puback(packet.packet_id))  # type: ignore[arg-type]
                if not output.reading and not output.scheduled:
                    output.schedule()
        elif qos == 2:
            self.session.incoming_qos2.add(packet.packet_id)  # type: ignore[union-attr,arg-type]
            self._ack(encode_pubrec(packet.packet_id), bool(status & STORED))  # type: ignore[arg-type]

    async def _publish_will(self, will: Message) -> None:
        auth = self.auth
        if auth is None:
            return
        decision = await auth.publish(will.topic)
        if decision.outcome is Outcome.ALLOW:
            self.ctx.metrics.messages_in[Protocol.MQTT] += 1
            self.ctx.router.publish(will)
        else:
            self.ctx.metrics.dropped(Protocol.MQTT, "will_denied")
            log.info("will message of %r on %r not published: %s", auth.identity.external_id, will.topic, decision.reason)

    # -- SUBSCRIBE --------------------------------------------------------------------------------

    async def _handle_subscribe(self, packet: Subscribe) -> None:
        session = self.session
        assert session is not None and self.auth is not None
        codes: list[int] = []
        retained: list[tuple[Message, int]] = []
        router = self.ctx.router
        cap = self.ctx.config.limits.max_subscriptions_per_client
        for topic_filter, requested_qos in packet.topics:
            try:
                validate_topic_filter(topic_filter, self._max_topic)
            except InvalidTopic as exc:
                log.info("SUBSCRIBE from %r: %s", session.client_id, exc)
                codes.append(SUBACK_FAILURE)
                continue
            if cap and topic_filter not in session.subscriptions and len(session.subscriptions) >= cap:
                # 0x80 per extra filter (what MQTT 3.1.1 has); the ones already held keep working.
                self.ctx.state.note_refused(self.listener.name, "max_subscriptions_per_client", self.peer)
                codes.append(SUBACK_FAILURE)
                continue
            # Slowed, not refused: reading pauses until the client's subscribe bucket has a token.
            await self._pauses.wait_for_token(self._subscribe_bucket)
            if self._closing:
                return
            decision = await self.auth.subscribe(topic_filter)
            if self._closing:
                return
            if decision.outcome is not Outcome.ALLOW:
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(requested_qos, 2)
            codes.append(granted)
            for message in session.subscribe(router, topic_filter, granted, decision.exclusions):
                retained.append((message, min(message.qos, granted)))
        self._output.write(encode_suback(packet.packet_id, codes))
        # Retained messages follow the SUBACK (MQTT-3.8.4-4 ordering as Mosquitto does).
        for message, qos in retained:
            session.deliver(message, qos, True, NO_PUBLISHER)


class MQTTFrontend(TCPListener):
    """One MQTT-over-TCP listener (plain, TLS or mTLS)."""

    protocol = Protocol.MQTT

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None:
        super().__init__(ctx, listener)
        self.registry = session_registry(ctx)

    @staticmethod
    def prepare(ctx: FrontendContext, snapshot: Snapshot) -> None:
        """Before any listener opens: the persistent sessions the store kept."""
        session_registry(ctx).restore(snapshot.queues_of(KEY_PREFIX))

    def connection_factory(self) -> Callable[[], MQTTConnection]:
        ctx, listener, registry = self.ctx, self.listener, self.registry
        return lambda: MQTTConnection(ctx, listener, registry)


def session_registry(ctx: FrontendContext) -> SessionRegistry:
    """The gateway's one registry of MQTT sessions, shared by the TCP and WebSocket listeners."""
    config = ctx.config
    return ctx.state.shared("mqtt.sessions", lambda: SessionRegistry(
        ctx.router,
        store=ctx.store,
        limits=limits_for(config.limits, Protocol.MQTT),
        metrics=ctx.metrics,
        max_inflight=config.limits.max_inflight_messages,
        session_expiry=config.mqtt.session_expiry,
    ))
