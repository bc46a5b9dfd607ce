"""The AMQP 1.0 frontend: SASL PLAIN of our own, then proton's I/O-free engine on asyncio.

Proton's server cannot check a PLAIN password from Python (LIBRARIES.md), so a
connection runs in two layers on one `asyncio.Protocol`, with no thread:

1. SASL (`gateway.amqp.sasl`, sans-IO): protocol header, sasl-mechanisms,
   sasl-init with PLAIN credentials, sasl-outcome. On a TLS connection whose
   client presented a verified certificate with an identity
   (`auth.mtls_identity`), EXTERNAL is offered too: the CONNECT event then
   carries that identity and no username or password; an initial response
   other than empty or that identity fails with outcome `auth`.
2. AMQP: every later byte goes to a server `proton.Transport` without a SASL
   layer; its `Collector` yields the events (open, attach, transfer, flow,
   disposition) this module acts on, and its output goes back to the socket.

When the credentials are checked. DESIGN.md sends the service the Open
frame's container-id as the client id, and the Open frame only comes after
the SASL outcome. So the SASL step checks only the form of the credentials
(a malformed PLAIN response or an unoffered mechanism fails with outcome
`auth`), answers ok, and keeps them; the one CONNECT decision is made when
the client's Open arrives, with the container-id as the client id, before
the gateway sends its own Open. A refused client gets our Open followed at
once by a Close whose condition says why:
    bad credentials          -> amqp:unauthorized-access ("bad credentials")
    auth service unavailable -> amqp:internal-error ("auth service unavailable ...")
This is one provider call per connection, keyed as DESIGN.md says, and the
two failures read differently in every client (proton's client reports every
failed sasl-outcome code as the same "Authentication failed", so a SASL-time
check could not tell them apart). Nothing the client sends after its Open is
acted on before the decision: event processing waits and reading pauses.

Links. A client's sender link publishes to its target address (the topic as
written), or, with no target address, to each message's `to`; the target is
authorized once at attach, an anonymous sender's messages one by one. A
client's receiver link subscribes its source address, the MQTT filter as
written. Denied attaches are refused (attach, then detach with
amqp:unauthorized-access); denied messages are rejected with that condition.
A receiver link beyond `limits.max_subscriptions_per_client` on one
connection is refused with amqp:resource-limit-exceeded.

Flow and settlement. Inbound processing runs on the pipeline MQTT and AMQP
0.9.1 share (`gateway.frontends.flow.InboundFlow`): proton's events are taken
from its collector after every read and handled in arrival order, at once
while nothing waits, by one worker task when an auth answer or a rate-limit
token must be awaited or the connection is held as a publisher. A message's
bytes are read from proton as its frames arrive; a complete message is one
publish event. The gateway grants each sender link `CREDIT_WINDOW` credit and
tops it up as messages are settled. An unsettled message is settled after
routing (at-least-once): `accepted` when every matching queue took it (once
the store has committed it, when a durable queue or the retained store wrote
it), `rejected` when a full queue refused it. What a publisher sees when a
subscriber's queue is full, by that queue's `limits.queue_overflow` policy:
    reject_new (the AMQP 1.0 default) -> rejected, amqp:resource-limit-exceeded,
        the description naming the full queue (polygate_messages_refused)
    block       -> accepted, and the connection is held: no more credit on its
        sender links until the queue has drained to half. What it already
        had credit for still arrives and waits, unsettled, to be routed in
        order when the hold ends (and so does a detach or close behind it).
    drop_oldest -> accepted; the queue's oldest message is dropped and counted
The memory watermark holds a publisher the same way, and so does the
gateway's shutdown (`drain`), which never lets go: nothing more is accepted.

Deliveries to a receiver link follow the client's credit, at most
`limits.max_inflight_messages` unsettled; the rest wait in the link's
`MessageQueue` (`limits.max_queued_messages` / `max_queued_bytes`, the AMQP
policy above; a connection is never held by its own receiver link). A
delivery the client releases or modifies is sent again; one it rejects is
dropped and counted. When a link or connection closes, its unsettled and
queued messages are counted as dropped ("unsettled_on_close",
"queued_on_close"): AMQP 1.0 sessions here are not persistent, so there is
nothing to keep them for. At shutdown the gateway first waits (`drained`)
until receivers have taken and settled what their links hold.

Payloads: a message's body bytes (a Data section or a binary value; a string
value as UTF-8) are the payload; messages to AMQP clients carry the payload
as one Data section and `to` set to the topic, so bytes are identical end
to end across protocols.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from proton import Collector, Condition, Connection, Delivery, Endpoint, Event, Link, Transport, TransportException
from proton import Message as AMQPMessage

from gateway.amqp.sasl import EXTERNAL, SaslCode, SaslError, SaslInit, SaslServer
from gateway.backpressure import DRAINING, NO_PUBLISHER, Blocker, Publisher
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.dispatcher import SessionAuth
from gateway.errors import InvalidTopic
from gateway.events import NO_SECRET, Action, AuthEvent, Decision, Outcome, Protocol
from gateway.frontends.flow import BYPASS, ORDERED, PUBLISH, AckOrder, InboundFlow, Output, ReadPauses, WriteGather, admit
from gateway.frontends.peers import NO_CERTIFICATE, password_refused, peer_address, peer_certificate
from gateway.frontends.tcp_listener import TCPListener
from gateway.queues import REFUSED, STORED, MessageQueue, limits_for
from gateway.router import Message
from gateway.topics import validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.amqp")

#: Advertised in our Open: a client silent for this long is dropped (proton sends
#: heartbeats for the client's own idle timeout).
IDLE_TIMEOUT = 60.0
#: Credit granted to each client sender link, topped up as messages are settled.
CREDIT_WINDOW = 100
#: Largest frame the gateway accepts and sends; larger messages span frames.
MAX_FRAME_SIZE = 65536
#: Sessions (channels) and links per connection: each link may hold a subscription.
CHANNEL_MAX = 255
MAX_LINKS = 256
#: Bytes of AMQP overhead (header, properties, annotations) allowed on top of
#: limits.max_message_size; past it a transfer is read and discarded, then rejected.
ENVELOPE_ALLOWANCE = 64 * 1024
#: Bytes of partly received messages one connection may hold, all its links together: this many
#: of the largest allowed messages, and at least MIN_PARTIAL_BYTES (one link never reaches it).
PARTIAL_MESSAGES = 8
MIN_PARTIAL_BYTES = 8 * 1024 * 1024
CONTAINER_ID = "polygate"

UNAUTHORIZED = "amqp:unauthorized-access"
#: No AMQP condition means "a service I depend on is down"; internal-error is the
#: closest, and its description says which.
UNAVAILABLE = "amqp:internal-error"
INVALID_FIELD = "amqp:invalid-field"
TOO_LARGE = "amqp:link:message-size-exceeded"
RESOURCE_LIMIT = "amqp:resource-limit-exceeded"
NOT_IMPLEMENTED = "amqp:not-implemented"
DECODE_ERROR = "amqp:decode-error"
FORCED = "amqp:connection:forced"

#: The first drop and then every this many are logged, per link.
DROP_LOG_EVERY = 1000

_UNAVAILABLE_TEXT = "auth service unavailable; try again later"
#: `_collect` result while a transfer is still arriving.
_INCOMPLETE = object()

#: One inbound event for the connection's InboundFlow: (kind, handler, argument).
_FlowEvent = tuple[int, Callable[["AMQPConnection", Any], Awaitable[None] | None], Any]


def _without_peer_bytes(description: str) -> str:
    """A proton error text up to where it quotes what the peer sent (it may hold a password)."""
    cut = min((i for i in (description.find("'"), description.find('"')) if i >= 0), default=len(description))
    return description[:cut].rstrip(" :")[:200]


def _refusal(decision: Decision, what: str) -> Condition:
    """The condition telling a client why an attach or a message was refused."""
    if decision.outcome is Outcome.UNAVAILABLE:
        return Condition(UNAVAILABLE, _UNAVAILABLE_TEXT)
    return Condition(UNAUTHORIZED, f"{what} not authorized")


def payload_of(message: AMQPMessage) -> bytes | None:
    """The payload of a received message, or None when its body is not bytes or text."""
    body = message.body
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        # Proton hands out memoryviews into C memory: copy before it is freed.
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    return None


def encode_for_client(message: Message) -> bytes:
    """A routed message as an AMQP message: the payload as one Data section, `to` = topic."""
    amqp = AMQPMessage(body=message.payload, inferred=True, address=message.topic)
    return bytes(amqp.encode())


class _Inbound:
    """A link on which the client sends (a proton receiver on our side)."""

    __slots__ = ("link", "topic", "closed")

    def __init__(self, link: Link, topic: str | None) -> None:
        self.link = link
        #: None for a sender with no target address: each message's `to` is its topic.
        self.topic = topic
        #: The client detached it (and proton's link is freed): its settlements are not sent.
        self.closed = False


class _Outbound:
    """A link on which the client receives: the router's subscriber for its source filter."""

    __slots__ = ("conn", "link", "topic_filter", "presettled", "queue", "unsettled", "_entries", "_tags", "_drops",
                 "closed")

    def __init__(self, conn: AMQPConnection, link: Link, topic_filter: str, presettled: bool) -> None:
        self.conn = conn
        self.link = link
        self.topic_filter = topic_filter
        self.presettled = presettled
        ctx = conn.ctx
        #: Messages waiting for the client's credit (or the inflight window).
        self.queue = MessageQueue(
            name=f"{conn.client_id}:{topic_filter}", protocol=Protocol.AMQP, limits=conn.queue_limits,
            budget=ctx.router.budget, metrics=ctx.metrics,
        )
        self._entries = self.queue.entries
        #: Deliveries sent and not yet settled by the client, in send order.
        self.unsettled: dict[Delivery, Message] = {}
        self._tags = itertools.count(1)
        self._drops = 0
        self.closed = False

    # The router keys subscribers by identity; keep the default object hash/eq.

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        if self.closed:
            return 0
        if not self._entries and self._can_send():
            self._send(message)
            return 0
        queue = self.queue
        # Never hold a connection back for its own link (that could stall both); it is still refused.
        return queue.put(message, 0, publisher, own=publisher is self.conn.publisher)

    def _can_send(self) -> bool:
        return (
            self.link.credit > 0
            and len(self.unsettled) < self.conn.max_inflight
            and self.conn.can_send()
        )

    def _send(self, message: Message) -> None:
        link = self.link
        delivery = link.delivery(str(next(self._tags)))
        link.send(self.conn.frontend.encode(message))
        link.advance()
        if self.presettled:
            delivery.settle()
        else:
            self.unsettled[delivery] = message
        self.conn.sent()

    def pump(self) -> None:
        entries = self._entries
        queue = self.queue
        while entries and self._can_send():
            self._send(queue.popleft()[0])
        link = self.link
        if link.drain_mode and not entries and link.credit > 0:
            # The client asked for what is there, and nothing is: give back the credit.
            link.drained()
            self.conn.schedule_flush()

    def settled(self, delivery: Delivery) -> None:
        """The client settled (or gave an outcome for) a delivery."""
        message = self.unsettled.pop(delivery, None)
        state = delivery.remote_state
        delivery.settle()
        if message is None:
            return
        if state == Delivery.RELEASED or (state == Delivery.MODIFIED and not delivery.remote.undeliverable):
            # Not processed by the client: send it again, ahead of newer messages.
            self.queue.appendleft((message, 0, 0))
        elif state == Delivery.REJECTED or state == Delivery.MODIFIED:
            # Rejected, or "not here": this link will not take it, and there is no other.
            self.drop("rejected")
        self.pump()

    def drained(self) -> bool:
        """Nothing waits for the client: no queued message, none sent and unsettled."""
        return not self.queue and not self.unsettled

    def drop(self, reason: str, count: int = 1) -> None:
        conn = self.conn
        conn.ctx.metrics.dropped(Protocol.AMQP, reason, count)
        before = self._drops
        self._drops += count
        if before == 0 or before // DROP_LOG_EVERY != self._drops // DROP_LOG_EVERY:
            log.warning(
                "dropped %d message(s) for AMQP client %r on %r: %s (%d so far on this link)",
                count, conn.client_id, self.topic_filter, reason, self._drops,
                extra={"event": "message_dropped", "client_id": conn.client_id, "reason": reason},
            )

    def close(self) -> None:
        """The link or its connection ended: what was not settled is lost, and counted."""
        if self.closed:
            return
        self.closed = True
        self.conn.ctx.router.unsubscribe_all(self)
        lost_unsettled = len(self.unsettled)
        self.unsettled.clear()
        # Also releases the publishers a full `block` queue held.
        lost_queued = self.queue.clear()
        if lost_unsettled:
            self.drop("unsettled_on_close", lost_unsettled)
        if lost_queued:
            self.drop("queued_on_close", lost_queued)


class _PublisherFlow(InboundFlow):
    """The connection's InboundFlow, holding it back the AMQP 1.0 way as well.

    While held, its publish events wait (InboundFlow) and its sender links get
    no credit top-up (`AMQPConnection._top_up`); when the last holder lets go,
    every link is topped up again.
    """

    __slots__ = ("conn",)

    def __init__(self, conn: AMQPConnection, output: Output, pauses: ReadPauses) -> None:
        super().__init__(conn.loop, conn, output, pauses, conn.ctx.ratelimits.new_message_bucket())
        self.conn = conn

    def release(self, blocker: Blocker) -> None:
        super().release(blocker)
        if not self.gate.held:
            self.conn.credit_all()


class AMQPConnection(asyncio.Protocol):
    """One client connection: the SASL step, then proton's engine driven by asyncio."""

    def __init__(self, frontend: AMQPFrontend) -> None:
        self.frontend = frontend
        self.ctx = frontend.ctx
        self.listener = frontend.listener
        self.loop = asyncio.get_running_loop()
        limits = self.ctx.config.limits
        self.queue_limits = limits_for(limits, Protocol.AMQP)
        self.max_inflight = max(1, limits.max_inflight_messages)
        self._max_payload = limits.max_message_size
        self._max_topic = limits.max_topic_length
        #: From the TCP connect until the gateway's Open (SASL and the auth decision included).
        self._handshake_timeout = limits.handshake_timeout
        #: Receiver links (subscriptions) one connection holds at once (0 = no cap).
        self._max_subscriptions = limits.max_subscriptions_per_client
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.certificate = NO_CERTIFICATE
        self.client_id = ""
        self.auth: SessionAuth | None = None
        requires_auth = self.ctx.dispatcher.requires_auth(Protocol.AMQP)
        self._sasl: SaslServer | None = SaslServer(
            mechanisms=("PLAIN",) if requires_auth else ("PLAIN", "ANONYMOUS"),
            allow_skip=not requires_auth,
        )
        self._credentials: SaslInit | None = None
        self._engine: Transport | None = None
        self._connection: Connection | None = None
        self._collector: Collector | None = None
        self._inbound: dict[Link, _Inbound] = {}
        self._outbound: dict[Link, _Outbound] = {}
        #: Partly received transfers: bytes so far, or None once too large to keep.
        self._partial: dict[Delivery, bytearray | None] = {}
        #: Bytes held in `_partial`, and how many it may hold (`_collect`).
        self._partial_bytes = 0
        self._max_partial = max(MIN_PARTIAL_BYTES, PARTIAL_MESSAGES * (self._max_payload + ENVELOPE_ALLOWANCE))
        #: SASL bytes, then the engine's output (pulled at each flush), gathered per read.
        self._output = Output(self.loop, self.ctx.state.shared("flow.gather", WriteGather), self._pull_output)
        self._pauses = ReadPauses(lambda: self._closing)
        #: Inbound events in order, and this connection's side of backpressure.
        self.publisher = _PublisherFlow(self, self._output, self._pauses)
        self._gate = self.publisher.gate
        #: Settlements of received messages in arrival order, each once the store
        #: committed what its message wrote.
        self._settlements = AckOrder(self.ctx.store, self._settle_now)
        self._router = self.ctx.router
        self._write_paused = False
        self._closing = False
        self._registered = False
        self._opened = False
        #: Links refused (attach answered, then detached) whose client has not detached them yet.
        self._refused_links: set[Link] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._metrics_in = self.ctx.metrics.messages_in
        self._metrics_out = self.ctx.metrics.messages_out

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._output.transport = transport
        self._pauses.attach(transport)
        ip, self.peer = peer_address(transport)
        self.certificate = peer_certificate(transport, self.ctx.config.auth.mtls_identity)
        if not admit(self.ctx, self.listener, self, Protocol.AMQP, ip, self.peer):
            self._closing = True
            transport.abort()
            return
        self._registered = True
        sasl = self._sasl
        if sasl is not None and self.certificate.identity and self.ctx.dispatcher.requires_auth(Protocol.AMQP):
            # EXTERNAL only where it can succeed: TLS with a verified certificate that has an
            # identity. Proton's client picks EXTERNAL whenever it is offered and allowed.
            sasl.mechanisms = (EXTERNAL, *sasl.mechanisms)
        self._timer = self.loop.call_later(self._handshake_timeout, self._on_handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for handle in (self._timer, self._tick_handle):
            if handle is not None:
                handle.cancel()
        self._timer = self._tick_handle = None
        self.publisher.close()
        self._settlements.clear()
        for outbound in self._outbound.values():
            outbound.close()
        self._outbound.clear()
        self._inbound.clear()
        self._refused_links.clear()
        self._partial.clear()
        if self.auth is not None:
            self.auth.close()
            self.auth = None
        self._credentials = None
        if self._collector is not None:
            # Free the events still queued (they hold the links and deliveries).
            self._collector.release()
        if self._engine is not None:
            self._engine.unbind()
        self._engine = self._connection = self._collector = None
        if self._registered:
            self._registered = False
            self.ctx.state.unregister(self.listener.name, self)
            self.ctx.metrics.connection_closed(Protocol.AMQP)
        log.debug("AMQP connection from %s (%r) closed: %s", self.peer, self.client_id, exc or "closed")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._opened and not self._closing:
            output = self._output
            output.reading = True
            try:
                for outbound in list(self._outbound.values()):
                    outbound.pump()
            finally:
                output.reading = False
            output.flush()

    def eof_received(self) -> bool | None:
        engine = self._engine
        if engine is not None and not self._closing:
            engine.close_tail()
            self._after_input()
        else:
            self._drop_peer("the peer closed its side during the handshake")
        return False

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        output = self._output
        output.reading = True
        try:
            if self._sasl is not None:
                data = self._sasl_received(data)
            if data and not self._closing:
                self._push(data)
        finally:
            output.reading = False
        if self._engine is not None:
            self._after_input()
        else:
            output.flush()

    # -- layer 1: SASL ------------------------------------------------------------------------

    def _sasl_received(self, data: bytes) -> bytes:
        """Feed the SASL step; return the bytes that belong to the AMQP layer (once it is done)."""
        sasl = self._sasl
        assert sasl is not None
        try:
            event = sasl.receive_data(data)
        except SaslError as exc:
            self._write(sasl.data_to_send() + exc.reply)
            self._drop_peer(str(exc))
            return b""
        self._write(sasl.data_to_send())
        if event is None:
            return b""
        if isinstance(event, SaslInit):
            refused = password_refused(self.ctx.config.auth, self.listener, event.secret)
            if refused is None and event.mechanism == EXTERNAL and event.authzid \
                    and event.authzid != self.certificate.identity:
                # Acting as another identity than the certificate's is not offered (as with PLAIN's authzid).
                refused = Decision.deny("EXTERNAL authorization identity is not the certificate's identity")
            if refused is not None:
                sasl.fail(SaslCode.AUTH)
                self._write(sasl.data_to_send())
                self._drop_peer(refused.reason)
                return b""
            self._credentials = event
            # Checked with the Open frame's container-id as the client id (module docstring).
            sasl.succeed()
            self._write(sasl.data_to_send())
        self._sasl = None
        self._start_engine()
        return sasl.remainder

    def _start_engine(self) -> None:
        engine = Transport(Transport.SERVER)
        engine.max_frame_size = MAX_FRAME_SIZE
        engine.channel_max = CHANNEL_MAX
        engine.idle_timeout = IDLE_TIMEOUT
        connection = Connection()
        collector = Collector()
        connection.collect(collector)
        engine.bind(connection)
        self._engine, self._connection, self._collector = engine, connection, collector

    # -- layer 2: proton's engine -------------------------------------------------------------

    def _push(self, data: bytes) -> None:
        engine = self._engine
        assert engine is not None
        view = memoryview(data)
        try:
            while view:
                capacity = engine.capacity()
                if capacity < 0:
                    return  # input closed (a protocol error): the rest is discarded
                if capacity == 0:
                    # Proton consumes input as it parses; no room means it stopped reading.
                    self._drop_peer("the AMQP engine accepts no more input")
                    return
                if capacity >= len(view):
                    engine.push(data if len(view) == len(data) else bytes(view))
                    return
                engine.push(bytes(view[:capacity]))
                view = view[capacity:]
        except TransportException as exc:
            self._drop_peer(f"AMQP engine error: {_without_peer_bytes(str(exc))}")

    def _after_input(self) -> None:
        """Hand what the engine made of the input to the inbound flow, then send what it produced."""
        if self._engine is None or self._closing:
            return
        try:
            events = self._take_events()
            self._tick()
        except UnicodeDecodeError:
            self._protocol_error(DECODE_ERROR, "a string field is not valid UTF-8")
            return
        except Exception:
            # Our own bug or an engine error on one client's input closes that client
            # only, with the cause in the log (events handled later: `flow_error`).
            log.exception("AMQP connection from %s (%r) failed", self.peer, self.client_id)
            self._drop_peer("internal error")
            return
        if events and not self._closing:
            self.publisher.feed(events)
        else:
            self._output.flush()

    def _take_events(self) -> list[_FlowEvent]:
        """Empty proton's collector into flow events (the events nobody acts on are left out).

        The bytes of incoming transfers are read here, as they arrive, so the
        session window keeps moving whatever waits; a complete message becomes
        one publish event.
        """
        collector = self._collector
        kinds = _KINDS
        events: list[_FlowEvent] = []
        while collector is not None and not self._closing:
            event = collector.peek()
            if event is None:
                break
            try:
                number = event.type.number
                if number == _DELIVERY:
                    item = self._delivery_event(event.delivery)
                else:
                    entry = kinds.get(number)
                    item = None if entry is None else (entry[0], entry[1], event)
            finally:
                collector.pop()
            if item is not None:
                events.append(item)
        return events

    def _tick(self) -> None:
        """Let proton run its timers (idle timeout, heartbeats); keep one timer for the next."""
        engine = self._engine
        if engine is None:
            return
        deadline = engine.tick(self.loop.time())
        handle = self._tick_handle
        # Input usually moves the deadline later: the pending timer then fires early,
        # harmlessly, and reschedules itself, instead of one new timer per read.
        if handle is not None and (not deadline or handle.when() <= deadline):
            return
        if handle is not None:
            handle.cancel()
        self._tick_handle = self.loop.call_at(deadline, self._on_tick) if deadline else None

    def _on_tick(self) -> None:
        self._tick_handle = None
        if self._engine is not None and not self._closing:
            self._tick()
            self._output.flush()

    # -- the inbound flow (FlowHandler) ---------------------------------------------------------

    def event_kind(self, event: _FlowEvent) -> int:
        return event[0]

    def handle(self, event: _FlowEvent) -> Awaitable[None] | None:
        if self._closing:
            return None
        return event[1](self, event[2])

    def flow_error(self, event: _FlowEvent, exc: Exception) -> None:
        if isinstance(exc, UnicodeDecodeError):
            # Proton decodes a string field (container-id, an address) only when it is read.
            self._protocol_error(DECODE_ERROR, "a string field is not valid UTF-8")
            return
        log.error("AMQP connection from %s (%r) failed", self.peer, self.client_id, exc_info=exc)
        self._drop_peer("internal error")

    def _protocol_error(self, name: str, description: str) -> None:
        """The client sent what cannot be acted on: close it with that condition (no traceback)."""
        connection = self._connection
        if connection is not None and not self._closing:
            if not self._opened:
                connection.container = CONTAINER_ID
                connection.open()
            connection.condition = Condition(name, description)
            connection.close()
        self._drop_peer(f"{name}: {description}")

    def publisher_name(self) -> str:
        return repr(self.client_id or self.peer)

    def drain(self) -> None:
        """The gateway stops: no more credit, what arrives now is not settled; deliveries still flow."""
        self.publisher.hold(DRAINING)

    def drained(self) -> bool:
        """Every receiver link took (and settled) what it was sent and what its queue held."""
        return all(outbound.drained() for outbound in self._outbound.values())

    # -- output -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data:
            self._output.write(data)

    def schedule_flush(self) -> None:
        """The engine has output: send it at the end of this read, or this loop turn."""
        output = self._output
        if not output.reading and not output.scheduled:
            output.schedule()

    def _pull_output(self) -> None:
        """Output's before_flush: what the engine produced goes after what is buffered."""
        engine = self._engine
        if engine is None:
            return
        buffer = self._output.buffer
        finished = False
        while True:
            pending = engine.pending()
            if pending < 0:
                finished = True  # the engine closed its output: all frames are out
                break
            if pending == 0:
                break
            chunk = engine.peek(pending)
            engine.pop(pending)
            if chunk:
                buffer.append(bytes(chunk))
        if finished:
            self._closing = True
            transport = self.transport
            if transport is not None and not transport.is_closing():
                if buffer:
                    transport.write(b"".join(buffer))
                transport.close()
            buffer.clear()

    def can_send(self) -> bool:
        return not self._write_paused and not self._closing

    def sent(self) -> None:
        self._metrics_out[Protocol.AMQP] += 1
        self.schedule_flush()

    # -- closing ------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close the connection (shutdown): a Close frame when the AMQP layer is up."""
        if self._closing or self.transport is None:
            return
        connection = self._connection
        if connection is not None and self._opened:
            connection.condition = Condition(FORCED, reason)
            connection.close()
        self._closing = True
        self._output.flush()
        self.transport.close()

    def _drop_peer(self, reason: str) -> None:
        """A protocol error: say what we can (already written), then close only this peer."""
        log.info("closing AMQP connection from %s: %s", self.peer, reason,
                 extra={"event": "protocol_error", "peer": self.peer})
        if self.transport is None or self._closing:
            return
        self._closing = True
        self._output.flush()
        self.transport.close()

    def _refuse_connection(self, condition: Condition) -> None:
        connection = self._connection
        assert connection is not None
        connection.container = CONTAINER_ID
        connection.condition = condition
        connection.open()
        connection.close()
        self._output.flush()
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if not self._opened:
            self._drop_peer(f"handshake not complete within {self._handshake_timeout:g}s (limits.handshake_timeout)")

    # -- connection and sessions --------------------------------------------------------------

    def _on_connection_remote_open(self, event: Event) -> Awaitable[None]:
        connection = event.connection
        self.client_id = connection.remote_container or f"amqp:{self.peer}"
        # Nothing the client sends after its Open is read before the decision.
        self._pauses.pause("auth")
        return self._authenticate()

    async def _authenticate(self) -> None:
        try:
            await self._decide_connect()
        finally:
            self._pauses.resume("auth")

    async def _decide_connect(self) -> None:
        credentials = self._credentials
        self._credentials = None
        event = AuthEvent(
            protocol=Protocol.AMQP,
            action=Action.CONNECT,
            client_id=self.client_id,
            username=credentials.username if credentials is not None else "",
            secret=credentials.secret if credentials is not None else NO_SECRET,
            peer=self.peer,
            tls_identity=self.certificate.identity,
            tls_serial=self.certificate.serial,
            tls_fingerprint=self.certificate.fingerprint,
        )
        decision = await self.ctx.dispatcher.decide(event)
        if self._closing:
            return
        if decision.outcome is Outcome.UNAVAILABLE:
            self._refuse_connection(Condition(UNAVAILABLE, _UNAVAILABLE_TEXT))
            return
        if decision.outcome is not Outcome.ALLOW or decision.identity is None:
            self._refuse_connection(Condition(UNAUTHORIZED, "bad credentials"))
            return
        self.auth = self.ctx.dispatcher.session(event, decision.identity)
        self._opened = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        connection = self._connection
        assert connection is not None
        connection.container = CONTAINER_ID
        connection.open()
        log.debug("AMQP client %r connected from %s as %r", self.client_id, self.peer,
                  decision.identity.external_id)

    def _on_connection_remote_close(self, event: Event) -> None:
        connection = event.connection
        if connection.state & Endpoint.LOCAL_ACTIVE:
            connection.close()

    def _on_session_remote_open(self, event: Event) -> None:
        session = event.session
        if session.state & Endpoint.LOCAL_UNINIT:
            session.open()

    def _on_session_remote_close(self, event: Event) -> None:
        session = event.session
        if session is None:  # a session event always has one
            return
        # Ending a session detaches its links without an event per link.
        for link in [link for link in (*self._inbound, *self._outbound, *self._refused_links) if link.session == session]:
            self._forget_link(link)
        if session.state & Endpoint.LOCAL_ACTIVE:
            session.close()
        # As for links: freed, with the links it still had, or beginning and ending sessions grows the connection.
        session.free()

    def _on_transport_error(self, event: Event) -> None:
        condition = event.transport.condition
        # Proton's description quotes the bytes it could not parse, and those can be a
        # second sasl-init's PLAIN credentials: log the condition without them.
        name = condition.name if condition is not None else "unknown"
        description = _without_peer_bytes(condition.description or "") if condition is not None else ""
        log.info("AMQP protocol error from %s: %s%s", self.peer, name, f": {description}" if description else "",
                 extra={"event": "protocol_error", "peer": self.peer})

    # -- links --------------------------------------------------------------------------------

    def _on_link_remote_open(self, event: Event) -> Awaitable[None] | None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return None
        if self.auth is None:
            # Proton takes an attach before any Open; nothing is served before the CONNECT decision.
            self._protocol_error("amqp:not-allowed", "a link was attached before the connection was opened")
            return None
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        if len(self._inbound) + len(self._outbound) >= MAX_LINKS:
            self._refuse_link(link, Condition(RESOURCE_LIMIT, f"at most {MAX_LINKS} links per connection"))
            return None
        if link.is_receiver:
            return self._attach_inbound(link)
        return self._attach_outbound(link)

    def _refuse_link(self, link: Link, condition: Condition) -> None:
        # An attach is answered before it is refused (AMQP 1.0 part 2.6.3).
        link.condition = condition
        link.open()
        link.close()
        # Proton keeps the link until the client's detach: a client that never sends it while
        # attaching more would grow the connection without bound (MAX_LINKS counts only open ones).
        self._refused_links.add(link)
        if len(self._refused_links) > MAX_LINKS:
            self._protocol_error(RESOURCE_LIMIT, f"more than {MAX_LINKS} refused links not detached")

    def _attach_inbound(self, link: Link) -> Awaitable[None] | None:
        address = link.remote_target.address
        if link.remote_target.dynamic:
            self._refuse_link(link, Condition(NOT_IMPLEMENTED, "dynamic targets are not supported"))
            return None
        if not address:
            self._open_inbound(link, None)
            return None
        try:
            validate_topic_name(address, self._max_topic)
        except InvalidTopic as exc:
            self._refuse_link(link, Condition(INVALID_FIELD, f"target address is not a topic: {exc}"))
            return None
        assert self.auth is not None
        decision = self.auth.publish_now(address)
        if decision is None:
            return self._await_inbound(link, address)
        self._decide_inbound(link, address, decision)
        return None

    async def _await_inbound(self, link: Link, address: str) -> None:
        assert self.auth is not None
        decision = await self.auth.publish(address)
        if not self._closing:
            self._decide_inbound(link, address, decision)

    def _decide_inbound(self, link: Link, address: str, decision: Decision) -> None:
        if decision.outcome is Outcome.ALLOW:
            self._open_inbound(link, address)
        else:
            self._refuse_link(link, _refusal(decision, f"publishing to {address!r} is"))

    def _open_inbound(self, link: Link, topic: str | None) -> None:
        link.max_message_size = self._max_payload + ENVELOPE_ALLOWANCE
        link.open()
        self._inbound[link] = _Inbound(link, topic)
        # No credit while this publisher is held: release tops every link up.
        self._top_up(link)

    def _attach_outbound(self, link: Link) -> Awaitable[None] | None:
        source = link.remote_source
        topic_filter = source.address
        if source.dynamic or not topic_filter:
            self._refuse_link(link, Condition(INVALID_FIELD, "a receiver needs a source address (a topic filter)"))
            return None
        try:
            validate_topic_filter(topic_filter, self._max_topic)
        except InvalidTopic as exc:
            self._refuse_link(link, Condition(INVALID_FIELD, f"source address is not a topic filter: {exc}"))
            return None
        cap = self._max_subscriptions
        # Attaches are handled one after the other (ORDERED), so no other one is still being decided.
        if cap and len(self._outbound) >= cap:
            self.ctx.state.note_refused(self.listener.name, "max_subscriptions_per_client", self.peer)
            # Only this attach is refused; the receiver links the client holds keep working.
            self._refuse_link(link, Condition(
                RESOURCE_LIMIT, f"at most {cap} receiver links per connection (limits.max_subscriptions_per_client)"))
            return None
        return self._await_outbound(link, topic_filter)

    async def _await_outbound(self, link: Link, topic_filter: str) -> None:
        assert self.auth is not None
        decision = await self.auth.subscribe(topic_filter)
        if self._closing:
            return
        if decision.outcome is not Outcome.ALLOW:
            self._refuse_link(link, _refusal(decision, f"subscribing to {topic_filter!r} is"))
            return
        presettled = link.remote_snd_settle_mode == Link.SND_SETTLED
        link.snd_settle_mode = Link.SND_SETTLED if presettled else Link.SND_UNSETTLED
        link.open()
        outbound = _Outbound(self, link, topic_filter, presettled)
        self._outbound[link] = outbound
        retained = self._router.subscribe(outbound, topic_filter, 0 if presettled else 1, decision.exclusions)
        for message in retained:
            outbound.deliver(message, message.qos, True, NO_PUBLISHER)
        # Credit (or a drain request) may have come while the decision was awaited.
        outbound.pump()
        self.schedule_flush()

    def _on_link_remote_close(self, event: Event) -> None:
        self._end_link(event.link, close=True)

    def _on_link_remote_detach(self, event: Event) -> None:
        # Resuming a detached link is not offered: a new attach of that name makes a new link.
        self._end_link(event.link, close=False)

    def _end_link(self, link: Link, *, close: bool) -> None:
        """The client detached a link: answer in kind, then free it."""
        self._forget_link(link)
        if link.state & Endpoint.LOCAL_ACTIVE:
            if close:
                link.close()
            else:
                link.detach()
        # Proton keeps every link of a connection until it is freed: without this, a client
        # attaching and detaching links grows its connection without bound. The detach just
        # queued is still sent (proton frees the link once the transport is done with it).
        link.free()

    def _forget_link(self, link: Link) -> None:
        self._refused_links.discard(link)
        outbound = self._outbound.pop(link, None)
        if outbound is not None:
            outbound.close()
        inbound = self._inbound.pop(link, None)
        if inbound is not None:
            inbound.closed = True
        for delivery in [d for d in self._partial if d.link == link]:
            self._forget_partial(delivery)

    def _on_link_flow(self, event: Event) -> None:
        outbound = self._outbound.get(event.link)
        if outbound is not None:
            outbound.pump()

    # -- credit ---------------------------------------------------------------------------------

    def _top_up(self, link: Link) -> None:
        """Credit back up to the window, unless this publisher is held (that is how AMQP 1.0 holds one)."""
        if not self._gate.held and link.state & Endpoint.LOCAL_ACTIVE and link.credit < CREDIT_WINDOW // 2:
            link.flow(CREDIT_WINDOW - link.credit)

    def credit_all(self) -> None:
        """No holder holds this publisher any more: every sender link gets its credit back."""
        if self._engine is None or self._closing:
            return
        for inbound in self._inbound.values():
            self._top_up(inbound.link)
        self.schedule_flush()

    # -- deliveries ---------------------------------------------------------------------------

    def _delivery_event(self, delivery: Delivery) -> _FlowEvent | None:
        """A DELIVERY event as the flow sees it: a settlement (bypasses held publishes) or a
        complete incoming message (a publish); None while a message is still arriving."""
        link = delivery.link
        if link.is_sender:
            return (BYPASS, AMQPConnection._on_outcome, delivery)
        if delivery.aborted:
            self._forget_partial(delivery)
            delivery.settle()
            return None
        inbound = self._inbound.get(link)
        if inbound is None or not delivery.readable:
            return None
        data = self._collect(delivery, link)
        if data is _INCOMPLETE:
            return None
        link.advance()
        return (PUBLISH, AMQPConnection._on_message, (inbound, delivery, data))

    def _on_outcome(self, delivery: Delivery) -> None:
        """The client settled, or gave an outcome for, a message sent on one of its receiver links."""
        outbound = self._outbound.get(delivery.link)
        if outbound is not None:
            if delivery.settled or delivery.remote_state:
                outbound.settled(delivery)
                self.schedule_flush()
        elif delivery.settled:
            delivery.settle()

    def _collect(self, delivery: Delivery, link: Link) -> bytearray | None | object:
        """Take the bytes that arrived: the whole message, None when too large, or _INCOMPLETE.

        Partial transfers are read as they arrive so the session window keeps
        moving; past the size limit they are read and discarded.
        """
        buffer = self._partial.pop(delivery, bytearray())
        chunk = link.recv(delivery.pending) or b""
        if buffer is not None:
            if len(buffer) + len(chunk) > self._max_payload + ENVELOPE_ALLOWANCE:
                self._partial_bytes -= len(buffer)
                buffer = None
            else:
                buffer += chunk
                self._partial_bytes += len(chunk)
        if delivery.partial:
            self._partial[delivery] = buffer
            if self._partial_bytes > self._max_partial:
                # One link never gets here; a client starting a large message on each of
                # many links at once would have the gateway hold all of them.
                self._protocol_error(RESOURCE_LIMIT, f"more than {self._max_partial} bytes of unfinished "
                                     "messages on this connection's links")
            return _INCOMPLETE
        if buffer is not None:
            self._partial_bytes -= len(buffer)
        return buffer

    def _forget_partial(self, delivery: Delivery) -> None:
        buffer = self._partial.pop(delivery, None)
        if buffer is not None:
            self._partial_bytes -= len(buffer)

    def _on_message(self, item: tuple[_Inbound, Delivery, bytearray | None]) -> Awaitable[None] | None:
        """A complete message from the client (rate limited and held back by the flow)."""
        inbound, delivery, data = item
        if data is None:
            self.ctx.metrics.dropped(Protocol.AMQP, "too_large")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(
                TOO_LARGE, f"a message may carry at most {self._max_payload} bytes (limits.max_message_size)"))
            return None
        message = AMQPMessage()
        try:
            message.decode(bytes(data))
        except Exception as exc:
            # Client bytes: proton raises MessageException, but its conversion of odd
            # values (bad UTF-8, unmapped types) can raise others; none may end the connection.
            self.ctx.metrics.dropped(Protocol.AMQP, "malformed")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(DECODE_ERROR, f"undecodable message: {exc}"))
            return None
        payload = payload_of(message)
        if payload is None:
            self.ctx.metrics.dropped(Protocol.AMQP, "malformed")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(
                INVALID_FIELD, "the body must be binary data or a string"))
            return None
        if len(payload) > self._max_payload:
            self.ctx.metrics.dropped(Protocol.AMQP, "too_large")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(
                TOO_LARGE, f"a message may carry at most {self._max_payload} bytes (limits.max_message_size)"))
            return None
        qos = 0 if delivery.settled else 1
        topic = inbound.topic
        if topic is not None:
            self._route(inbound, delivery, Message(topic, payload, qos, False))
            return None
        try:
            topic = message.address or ""
        except UnicodeDecodeError:
            self.ctx.metrics.dropped(Protocol.AMQP, "bad_topic")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(DECODE_ERROR, "`to` is not valid UTF-8"))
            return None
        try:
            validate_topic_name(topic, self._max_topic)
        except InvalidTopic as exc:
            self.ctx.metrics.dropped(Protocol.AMQP, "bad_topic")
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(
                INVALID_FIELD, f"a sender without a target address must set `to` to a topic: {exc}"))
            return None
        assert self.auth is not None
        decision = self.auth.publish_now(topic)
        if decision is None:
            return self._await_message(inbound, delivery, Message(topic, payload, qos, False))
        self._act_on_message(inbound, delivery, Message(topic, payload, qos, False), decision)
        return None

    async def _await_message(self, inbound: _Inbound, delivery: Delivery, message: Message) -> None:
        assert self.auth is not None
        decision = await self.auth.publish(message.topic)
        if not self._closing:
            self._act_on_message(inbound, delivery, message, decision)

    def _act_on_message(self, inbound: _Inbound, delivery: Delivery, message: Message, decision: Decision) -> None:
        if decision.outcome is Outcome.ALLOW:
            self._route(inbound, delivery, message)
            return
        reason = "auth_unavailable" if decision.outcome is Outcome.UNAVAILABLE else "denied"
        self.ctx.metrics.dropped(Protocol.AMQP, reason)
        self._settle_in(inbound, delivery, Delivery.REJECTED, _refusal(decision, f"publishing to {message.topic!r} is"))

    def _route(self, inbound: _Inbound, delivery: Delivery, message: Message) -> None:
        self._metrics_in[Protocol.AMQP] += 1
        status = self._router.publish(message, self.publisher)
        if status & REFUSED:
            self.ctx.metrics.messages_refused[Protocol.AMQP] += 1
            self._settle_in(inbound, delivery, Delivery.REJECTED, Condition(
                RESOURCE_LIMIT, f"a queue subscribed to {message.topic!r} is full (limits.max_queued_messages / "
                                "max_queued_bytes, queue_overflow reject_new): the message was refused"),
                bool(status & STORED))
        else:
            self._settle_in(inbound, delivery, Delivery.ACCEPTED, None, bool(status & STORED))

    def _settle_in(self, inbound: _Inbound, delivery: Delivery, outcome: Any, condition: Condition | None,
                   stored: bool = False) -> None:
        """Settle a received message: in arrival order, once what it stored is committed."""
        item = (inbound, delivery, outcome, condition)
        if delivery.settled:
            # Pre-settled by the client: nothing to tell it, nothing to wait for.
            self._settle_now(item)
        else:
            self._settlements.ack(item, stored)

    def _settle_now(self, item: tuple[_Inbound, Delivery, Any, Condition | None]) -> None:
        """AckOrder's send: the outcome goes to the client, and the link's credit is topped up."""
        inbound, delivery, outcome, condition = item
        if self._engine is None or inbound.closed:
            # Gone, or detached while its store write committed: its link is freed, nothing to tell.
            return
        if not delivery.settled:
            if condition is not None:
                delivery.local.condition = condition
            delivery.update(outcome)
        delivery.settle()
        self._top_up(inbound.link)
        self.schedule_flush()


_DELIVERY = Event.DELIVERY.number

#: What the flow does with each proton event acted on: (kind, handler). Deliveries: `_delivery_event`.
_KINDS: dict[int, tuple[int, Callable[[AMQPConnection, Any], Awaitable[None] | None]]] = {
    Event.CONNECTION_REMOTE_OPEN.number: (ORDERED, AMQPConnection._on_connection_remote_open),
    Event.CONNECTION_REMOTE_CLOSE.number: (ORDERED, AMQPConnection._on_connection_remote_close),
    Event.SESSION_REMOTE_OPEN.number: (ORDERED, AMQPConnection._on_session_remote_open),
    Event.SESSION_REMOTE_CLOSE.number: (ORDERED, AMQPConnection._on_session_remote_close),
    Event.LINK_REMOTE_OPEN.number: (ORDERED, AMQPConnection._on_link_remote_open),
    Event.LINK_REMOTE_CLOSE.number: (ORDERED, AMQPConnection._on_link_remote_close),
    Event.LINK_REMOTE_DETACH.number: (ORDERED, AMQPConnection._on_link_remote_detach),
    # Credit for a receiver link drains the queues that may hold publishers: never waits behind them.
    Event.LINK_FLOW.number: (BYPASS, AMQPConnection._on_link_flow),
    Event.TRANSPORT_ERROR.number: (BYPASS, AMQPConnection._on_transport_error),
}


class AMQPFrontend(TCPListener):
    """One AMQP 1.0 listener (plain or TLS)."""

    protocol = Protocol.AMQP

    def __init__(self, ctx: FrontendContext, listener: ListenerConfig) -> None:
        super().__init__(ctx, listener)
        # One routed message usually goes to several links: encode it once.
        self._encoded_for: Message | None = None
        self._encoded = b""

    def encode(self, message: Message) -> bytes:
        if message is not self._encoded_for:
            self._encoded = encode_for_client(message)
            self._encoded_for = message
        return self._encoded

    def connection_factory(self) -> Callable[[], AMQPConnection]:
        return lambda: AMQPConnection(self)
