"""The MQTT frontend (3.1.1 and 5): the adapter between a transport, the protocol core, auth and the router.

Transport bytes go into the sans-IO core (`gateway.mqtt.connection.ServerConnection`),
which checks the protocol and hands out packets; each becomes an `AuthEvent`
for the dispatcher where it needs a decision; the decision is acted on through
this module's small tables of MQTT 5 reason codes (the core turns them into
what 3.1.1 can say) and allowed messages go to the router. The core's bytes go
out through one gathered write per read and loop turn. TCP and WebSocket
listeners share this class (WebSocket through `WebSocketTransport`).

The publish hot path runs inside `data_received`: on a decision-cache hit
(or the provider's in-memory answer) it costs no task and no await. Only when
an answer must be awaited does the connection start one task that works
through the packets in arrival order, so a slow auth call stalls only its own
client. Deliveries and successful acknowledgements skip the core's `send`
(their bytes come from its per-version head and packet-id encoders).
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
from gateway.dispatcher import SessionAuth
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
from gateway.frontends.peers import NO_CERTIFICATE, password_refused, peer_address, peer_certificate
from gateway.frontends.tcp_listener import TCPListener
from gateway.message import Message
from gateway.mqtt import reasons
from gateway.mqtt.codec import PINGRESP_BYTES, encode_puback, encode_pubcomp, encode_pubrec, encode_pubrel
from gateway.mqtt.connection import ServerConnection, State
from gateway.mqtt.packets import (
    RETAIN_DO_NOT_SEND,
    RETAIN_SEND_IF_NEW,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from gateway.mqtt.properties import Properties
from gateway.mqtt.session import KEY_PREFIX, Session, SessionRegistry
from gateway.queues import REFUSED, STORED, limits_for
from gateway.store.base import Snapshot
from gateway.topics import validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.mqtt")

_ALLOW = Outcome.ALLOW
_CONNECTED = State.CONNECTED
#: MQTT 5 shared subscriptions (`$share/<group>/<filter>`) are not served yet: refused per filter on v5.
_SHARED_PREFIX = "$share/"
#: The largest Session Expiry Interval (0xFFFFFFFF means "never expires").
_MAX_EXPIRY = 0xFFFF_FFFF


def _connack_reason(decision: Decision, connect: Connect) -> int:
    """The CONNACK reason code (MQTT 5; the core says it in 3.1.1's codes) for an auth decision."""
    if decision.outcome is Outcome.ALLOW:
        return reasons.SUCCESS if decision.identity is not None else reasons.NOT_AUTHORIZED
    if decision.outcome is Outcome.UNAVAILABLE:
        return reasons.SERVER_BUSY if _busy(decision) else reasons.SERVER_UNAVAILABLE
    # A client that presented no credentials at all is "not authorized"
    # (anonymous access is off); presented credentials were wrong.
    if connect.username is None and connect.password is None:
        return reasons.NOT_AUTHORIZED
    return reasons.BAD_USER_NAME_OR_PASSWORD


def _busy(decision: Decision) -> bool:
    """An unavailable answer that was shed for load (the dispatcher's call slots, the local
    provider's password workers) rather than a provider that could not be reached."""
    reason = decision.reason
    return "busy" in reason or "overloaded" in reason


#: SUBACK reason codes (MQTT 5) per subscribe decision outcome that is not an allow.
_SUBACK_REFUSAL = {Outcome.DENY: reasons.NOT_AUTHORIZED, Outcome.UNAVAILABLE: reasons.UNSPECIFIED_ERROR}


class _SharedHead:
    """The PUBLISH head (fixed header and topic) last encoded, kept for the next one alike.

    A head depends only on the topic, the payload's length, the flags and the
    protocol version, so it is shared by every subscriber of one message and,
    since publishers mostly repeat a topic and a size, by the next messages
    too. Topics are compared by identity: the decoder hands out one str per
    repeated topic. One per gateway (its connections share one event loop, so
    no locking).
    """

    __slots__ = ("topic", "size", "variant", "head")

    def __init__(self) -> None:
        self.topic = ""
        self.size = -1
        self.variant = -1
        self.head = b""


class MQTTConnection(asyncio.Protocol):
    __slots__ = (
        "ctx", "listener", "registry", "loop", "transport", "core", "peer", "certificate",
        "session", "auth", "connect", "will", "publisher", "_output", "_buf", "_acks", "_paused",
        "_closing", "_clean_disconnect", "_last_rx", "_keepalive_handle",
        "_metrics_out", "_metrics_in", "_max_payload", "_max_topic", "_deny_disconnect",
        "_registered", "_taken_over", "_pauses", "_received", "_sent",
        "_router", "_shared_head", "_subscribe_bucket", "_v5", "_version_bit", "_packet_id_bytes",
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
        self.core = ServerConnection(max_packet_size=limits.max_message_size + limits.max_topic_length + 16)
        self.peer = ""
        self.certificate = NO_CERTIFICATE
        self.session: Session | None = None
        self.auth: SessionAuth | None = None
        self.connect: Connect | None = None
        self.will: Message | None = None
        # The version's wire details the delivery path needs, fixed at CONNECT.
        self._v5 = False
        self._version_bit = 0
        self._packet_id_bytes = self.core.packet_id_bytes
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
        self.certificate = peer_certificate(transport, self.ctx.config.auth.mtls_identity)
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
            packets = self.core.events(data)
        except MQTTProtocolError as exc:
            # Act on what arrived intact first (e.g. a PUBLISH before the garbage).
            self.publisher.feed(list(exc.decoded))
            self._protocol_error(exc)
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
        # The core let no PUBLISH through before CONNECT; without a session the CONNECT was refused.
        if self.session is None or self._closing:
            return None
        return self._publish(packet)

    def handle(self, packet: object) -> Awaitable[None] | None:
        if self._closing:
            return None
        kind = type(packet)
        session = self.session
        if kind is Publish:
            return self.publish(packet)  # type: ignore[arg-type]
        if kind is Connect:
            return self._handle_connect(packet)  # type: ignore[arg-type]
        if session is None:
            return None  # only AUTH or DISCONNECT can come before a CONNECT is answered
        if kind is Puback:
            session.puback(packet.packet_id)  # type: ignore[attr-defined]
        elif kind is Pubrel:
            self._handle_pubrel(session, packet)  # type: ignore[arg-type]
        elif kind is Pubrec:
            self._handle_pubrec(session, packet)  # type: ignore[arg-type]
        elif kind is Pubcomp:
            session.pubcomp(packet.packet_id)  # type: ignore[attr-defined]
        elif kind is Pingreq:
            self._output.write(PINGRESP_BYTES)
        elif kind is Subscribe:
            return self._handle_subscribe(packet)  # type: ignore[arg-type]
        elif kind is Unsubscribe:
            self._handle_unsubscribe(session, packet)  # type: ignore[arg-type]
        elif kind is Disconnect:
            self._clean_disconnect = True
            # MQTT 5: 0x04 asks for the will to be published all the same.
            if packet.reason_code != reasons.DISCONNECT_WITH_WILL_MESSAGE:  # type: ignore[attr-defined]
                self.will = None
            else:
                self._clean_disconnect = False
            self.close("client disconnected")
        elif kind is Auth:
            # Re-authentication (the only AUTH the core lets through after CONNACK) is not offered yet.
            self.close("re-authentication is not supported", reasons.IMPLEMENTATION_SPECIFIC_ERROR)
        return None

    def flow_error(self, packet: object, exc: Exception) -> None:
        log.error("MQTT connection from %s failed on %s", self.peer, type(packet).__name__, exc_info=exc)
        self.close("internal error", reasons.IMPLEMENTATION_SPECIFIC_ERROR)

    def publisher_name(self) -> str:
        return repr(self.session.client_id if self.session is not None else self.peer)

    def drain(self) -> None:
        """The gateway stops: publishes from now on wait (unacknowledged); acknowledgements still flow."""
        self.publisher.hold(DRAINING)

    def drained(self) -> bool:
        return self.session is None or self.session.drained()

    # -- output --------------------------------------------------------------------------------

    def _send(self, packet: Packet) -> None:
        """A packet through the core (its version's form, its state checks); nothing once the core closed."""
        if self.core.state is State.CLOSED:
            return
        data = self.core.send(packet)
        if data:
            self._output.write(data)

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
        variant = qos | (4 if retain else 0) | (8 if dup else 0) | self._version_bit
        if shared.topic is topic and shared.size == size and shared.variant == variant:
            head = shared.head
        else:
            head = self.core.publish_head(topic, size, qos, retain, dup)
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
            buf.append(self._packet_id_bytes(packet_id))
        buf.append(payload)
        self._sent += 1

    def send_pubrel(self, packet_id: int) -> None:
        self._output.write(encode_pubrel(packet_id))

    # -- closing --------------------------------------------------------------------------------

    def close(self, reason: str, reason_code: int | None = None) -> None:
        """Close the connection (shutdown, takeover, deny): flush what is pending first.

        An MQTT 5 client that is connected is told why in a DISCONNECT
        (`reason_code`; when None, 0x8B while the gateway stops, else 0x80).
        """
        if self._closing or self.transport is None:
            return
        self._closing = True
        if reason_code is None:
            reason_code = reasons.SERVER_SHUTTING_DOWN if self.ctx.state.shutting_down else reasons.UNSPECIFIED_ERROR
        goodbye = self.core.close(reason_code, reason)
        if goodbye:
            self._output.write(goodbye)
        self._output.flush()
        self.transport.close()

    def _protocol_error(self, error: MQTTProtocolError) -> None:
        """The client broke the protocol: tell it what the core says its version can hear, then close."""
        if self._closing:
            return
        log.info("closing MQTT connection from %s: %s", self.peer, error,
                 extra={"event": "protocol_error", "peer": self.peer})
        answer = self.core.reject(error)
        if answer:
            self._output.write(answer)
        self.close(str(error))

    def _connect_timeout(self) -> None:
        self._keepalive_handle = None
        if self.connect is None:
            self._protocol_error(MQTTProtocolError(
                f"no CONNECT within {self.ctx.config.limits.handshake_timeout:g}s", reason_code=reasons.PROTOCOL_ERROR))

    def _keepalive_check(self, interval: float) -> None:
        idle = self.loop.time() - self._last_rx
        if idle >= interval:
            self._keepalive_handle = None
            message = f"keepalive expired ({idle:.1f}s without a packet)"
            log.info("closing MQTT connection from %s: %s", self.peer, message,
                     extra={"event": "protocol_error", "peer": self.peer})
            self.close(message, reasons.KEEP_ALIVE_TIMEOUT)
            return
        self._keepalive_handle = self.loop.call_later(interval - idle, self._keepalive_check, interval)

    # -- CONNECT ----------------------------------------------------------------------------------

    async def _handle_connect(self, connect: Connect) -> None:
        ctx = self.ctx
        self.connect = connect
        self._v5 = v5 = connect.protocol_level == 5
        self._version_bit = 16 if v5 else 0
        self._packet_id_bytes = self.core.packet_id_bytes
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        client_id = connect.client_id or f"auto-{uuid.uuid4().hex}"
        will = self._will_of(connect)
        if self._closing:
            return
        if v5 and connect.properties.authentication_method is not None:
            # Enhanced authentication (AUTH) is not offered yet; MQTT 5 lets a server say so.
            self._refuse_connect(reasons.BAD_AUTHENTICATION_METHOD, "authentication method not supported")
            return
        event = AuthEvent(
            protocol=Protocol.MQTT,
            action=Action.CONNECT,
            client_id=client_id,
            username=connect.username or "",
            secret=Secret(connect.password or b""),
            peer=self.peer,
            tls_identity=self.certificate.identity,
            tls_serial=self.certificate.serial,
            tls_fingerprint=self.certificate.fingerprint,
        )
        refused = password_refused(ctx.config.auth, self.listener, event.secret)
        decision = refused or await ctx.dispatcher.decide(event)
        if self._closing:
            return
        # 0x87 / 0x05 as Mosquitto answers every refusal: the password may be right, this listener does not take it.
        code = reasons.NOT_AUTHORIZED if refused else _connack_reason(decision, connect)
        if code != reasons.SUCCESS or decision.identity is None:
            self._refuse_connect(code, decision.reason)
            return
        self._take_over(client_id)
        session, session_present = self._open_session(client_id, connect, decision)
        self.session = session
        self.auth = ctx.dispatcher.session(event, decision.identity)
        self.will = will
        self._send(Connack(session_present=session_present, properties=self._connack_properties(connect, client_id)))
        # An MQTT 5 client's receive maximum caps the QoS 1/2 deliveries in flight to it.
        session.set_window(min(self.registry.max_inflight, self.core.client_receive_maximum))
        session.attach(self)
        keepalive = self.core.keepalive
        if keepalive:
            interval = keepalive * 1.5
            self._keepalive_handle = self.loop.call_later(interval, self._keepalive_check, interval)
        log.debug("client %r connected from %s as %r (MQTT %s)", client_id, self.peer, decision.identity.external_id,
                  "5" if v5 else "3.1.1")

    def _will_of(self, connect: Connect) -> Message | None:
        """The will as a routable message; None without one, or when its topic is refused (the connection closes)."""
        if connect.will is None:
            return None
        try:
            validate_topic_name(connect.will.topic, self._max_topic)
        except InvalidTopic as exc:
            self._protocol_error(MQTTProtocolError(f"invalid will topic: {exc}", reason_code=reasons.TOPIC_NAME_INVALID))
            return None
        return Message(connect.will.topic, connect.will.payload, connect.will.qos, connect.will.retain)

    def _refuse_connect(self, reason_code: int, why: str) -> None:
        self._send(Connack(reason_code=reason_code))
        self.close(f"CONNECT refused (0x{reason_code:02x}: {why})")

    def _take_over(self, client_id: str) -> None:
        """Session takeover (MQTT-3.1.4-2): an older connection with this client id goes."""
        previous = self.registry.owners.get(client_id)
        if isinstance(previous, MQTTConnection) and previous is not self:
            previous._taken_over = True
            previous.close("session taken over by a new connection", reasons.SESSION_TAKEN_OVER)
            if previous.session is not None:
                previous.session.detach(previous)
            if previous.will is not None and not previous._clean_disconnect:
                self.ctx.state.spawn(previous._publish_will(previous.will), name=f"mqtt-will-{client_id}")
                previous.will = None
        self.registry.owners[client_id] = self

    def _open_session(self, client_id: str, connect: Connect, decision: Decision) -> tuple[Session, bool]:
        """The session this connection takes (a kept one, or a new one) and whether it was kept."""
        identity = decision.identity
        assert identity is not None
        registry = self.registry
        if self._v5:
            # MQTT 5: clean start discards a kept session; a session expiry interval keeps this one.
            persistent = bool(connect.properties.session_expiry_interval)
        else:
            persistent = not connect.clean_session
        session = registry.sessions.get(client_id)
        if session is not None and (connect.clean_session or session.identity.external_id != identity.external_id):
            # A clean start, or a different identity: never hand one user's session to another.
            registry.discard(session)
            session = None
        if session is None:
            return registry.create(client_id, clean=not persistent, identity=identity), False
        registry.connected(session)
        if self._v5 and not persistent:
            session.clean = True  # resumed, but ends with this connection (session expiry interval 0)
        return session, True

    def _connack_properties(self, connect: Connect, client_id: str) -> Properties:
        """MQTT 5: what this server announces, and what it decided for the client."""
        if not self._v5:
            return Properties()
        named: dict[str, object] = {
            # Not served yet: a v5 client must not use them (refused per SUBSCRIBE / filter).
            "subscription_identifier_available": 0,
            "shared_subscription_available": 0,
        }
        if not connect.client_id:
            named["assigned_client_identifier"] = client_id
        requested = connect.properties.session_expiry_interval
        if requested:
            # Offline sessions are kept for mqtt.session_expiry, whatever was asked for.
            kept = min(int(self.registry.session_expiry), _MAX_EXPIRY)
            if kept != requested:
                named["session_expiry_interval"] = kept
        return Properties(**named)

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
                self._protocol_error(MQTTProtocolError(
                    f"invalid topic in PUBLISH: {exc}", reason_code=reasons.TOPIC_NAME_INVALID))
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
        reason_code = 0
        if outcome is _ALLOW:
            payload = packet.payload
            if len(payload) > self._max_payload:
                self.ctx.metrics.dropped(Protocol.MQTT, "too_large")
                log.warning("dropped PUBLISH from %r: payload of %d bytes exceeds limits.max_message_size",
                            self.session.client_id if self.session else "", len(payload))
                reason_code = reasons.IMPLEMENTATION_SPECIFIC_ERROR
            else:
                publisher = self.publisher
                # MQTT 3.1.1 cannot tell a QoS 1/2 publisher "refused": a full
                # reject_new queue holds it back instead of losing what is acknowledged.
                # MQTT 5 can (0x97), so its publishers are refusable at every QoS.
                publisher.refusable = qos == 0 or self._v5
                # A Publish is a Message: routed as it is, no copy of its fields.
                status = self._router.publish(packet, publisher)
                if status & REFUSED and self._v5:
                    reason_code = reasons.QUOTA_EXCEEDED
        elif outcome is Outcome.UNAVAILABLE:
            self.ctx.metrics.dropped(Protocol.MQTT, "auth_unavailable")
            if qos:
                # Not acknowledged: the client still owns the message and resends it
                # (with DUP) after reconnecting, once auth answers again.
                self.close("auth service unavailable", reasons.SERVER_BUSY)
                return
        else:
            self.ctx.metrics.dropped(Protocol.MQTT, "denied")
            if self._deny_disconnect:
                self.close("publish denied", reasons.NOT_AUTHORIZED)
                return
            reason_code = reasons.NOT_AUTHORIZED
        if qos == 1:
            packet_id: int = packet.packet_id  # type: ignore[assignment]
            if reason_code and self._v5:
                self._ack(self.core.send(Puback(packet_id, reason_code)), bool(status & STORED))
                return
            acks = self._acks
            if status & STORED or acks.waiting:
                acks.ack(encode_puback(packet_id), bool(status & STORED))
            else:
                output = self._output
                output.buffer.append(encode_puback(packet_id))
                if not output.reading and not output.scheduled:
                    output.schedule()
        elif qos == 2:
            packet_id = packet.packet_id  # type: ignore[assignment]
            if reason_code and self._v5:
                # A refusal ends the QoS 2 exchange: no PUBREL follows (MQTT 5, 4.3.3).
                self._ack(self.core.send(Pubrec(packet_id, reason_code)), bool(status & STORED))
                return
            self.session.incoming_qos2.add(packet_id)  # type: ignore[union-attr]
            self._ack(encode_pubrec(packet_id), bool(status & STORED))

    def _handle_pubrel(self, session: Session, packet: Pubrel) -> None:
        # An unknown id gets a PUBCOMP all the same, as Mosquitto answers: it may be a PUBREL
        # repeated after a reconnect, or one a client sends after a refused PUBREC (paho does).
        session.incoming_qos2.discard(packet.packet_id)
        self._ack(encode_pubcomp(packet.packet_id), False)

    def _handle_pubrec(self, session: Session, packet: Pubrec) -> None:
        packet_id = packet.packet_id
        if reasons.is_error(packet.reason_code):
            # MQTT 5: the client refused the message; the exchange ends without PUBREL.
            if session.pubrec(packet_id):
                session.pubcomp(packet_id)
        elif session.pubrec(packet_id):
            self._output.write(encode_pubrel(packet_id))
        elif self._v5 and packet_id not in session.inflight:
            self._send(Pubrel(packet_id, reasons.PACKET_IDENTIFIER_NOT_FOUND))

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
        for topic_filter, options in packet.topics:
            code = self._filter_refusal(session, topic_filter)
            if code:
                codes.append(code)
                continue
            # Slowed, not refused: reading pauses until the client's subscribe bucket has a token.
            await self._pauses.wait_for_token(self._subscribe_bucket)
            if self._closing:
                return
            decision = await self.auth.subscribe(topic_filter)
            if self._closing:
                return
            if decision.outcome is not Outcome.ALLOW:
                codes.append(_SUBACK_REFUSAL[decision.outcome])
                continue
            granted = options.qos
            codes.append(granted)
            existed = topic_filter in session.subscriptions
            messages = session.subscribe(router, topic_filter, granted, decision.exclusions)
            if options.retain_handling == RETAIN_DO_NOT_SEND or (
                options.retain_handling == RETAIN_SEND_IF_NEW and existed
            ):
                continue
            for message in messages:
                retained.append((message, min(message.qos, granted)))
        self._send(Suback(packet_id=packet.packet_id, reason_codes=tuple(codes)))
        # Retained messages follow the SUBACK (MQTT-3.8.4-4 ordering as Mosquitto does).
        for message, qos in retained:
            session.deliver(message, qos, True, NO_PUBLISHER)

    def _filter_refusal(self, session: Session, topic_filter: str) -> int:
        """The SUBACK reason code (MQTT 5) refusing a filter before auth is asked, or 0."""
        try:
            validate_topic_filter(topic_filter, self._max_topic)
        except InvalidTopic as exc:
            log.info("SUBSCRIBE from %r: %s", session.client_id, exc)
            return reasons.TOPIC_FILTER_INVALID
        if self._v5 and topic_filter.startswith(_SHARED_PREFIX):
            return reasons.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
        cap = self.ctx.config.limits.max_subscriptions_per_client
        if cap and topic_filter not in session.subscriptions and len(session.subscriptions) >= cap:
            # One refusal per extra filter; the ones already held keep working.
            self.ctx.state.note_refused(self.listener.name, "max_subscriptions_per_client", self.peer)
            return reasons.QUOTA_EXCEEDED
        return 0

    def _handle_unsubscribe(self, session: Session, packet: Unsubscribe) -> None:
        codes = []
        for topic_filter in packet.topics:
            codes.append(reasons.SUCCESS if topic_filter in session.subscriptions else reasons.NO_SUBSCRIPTION_EXISTED)
            session.unsubscribe(self._router, topic_filter)
        self._send(Unsuback(packet.packet_id, tuple(codes)))


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
