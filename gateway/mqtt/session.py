"""MQTT sessions: what outlives a connection when the client asked for it.

A `Session` is the router's subscriber. It holds its subscriptions, the
outgoing QoS 1/2 messages in flight, the queue (`gateway.queues.MessageQueue`)
of messages waiting for a free in-flight slot or for the client to come back,
and the packet ids of incoming QoS 2 messages awaiting PUBREL. A connection
attaches to a session and detaches when it ends; a clean session dies with
its connection.

A persistent session (clean session 0) is durable when the store is: its
subscriptions and identity are kept in the store, and so is every QoS 1/2
message for it from the moment the router hands it over until the client
acknowledges it, so a restart finds the session with its messages. An offline
persistent session is freed after `mqtt.session_expiry`, also across restarts.
Across a restart, a message that was in flight is sent again as a new
delivery (at least once); QoS 2's exactly-once holds within one process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol as TypingProtocol

from gateway.backpressure import Publisher
from gateway.events import Identity, Protocol
from gateway.message import Message
from gateway.metrics import Metrics
from gateway.queues import REFUSED, STORED, MemoryBudget, MessageQueue, QueueLimits
from gateway.store.base import Store, StoredQueue

if TYPE_CHECKING:
    from gateway.router import Router

log = logging.getLogger("polygate.mqtt")

#: Outgoing QoS 2 states: PUBLISH sent awaiting PUBREC, PUBREL sent awaiting PUBCOMP.
WAIT_ACK = 0  # QoS 1 PUBLISH sent, awaiting PUBACK
WAIT_REC = 1
WAIT_COMP = 2

#: Store keys of MQTT sessions start with this.
KEY_PREFIX = "mqtt:"
#: A queued message's meta int: its delivery QoS, and RETAIN_FLAG when it goes out with retain set.
RETAIN_FLAG = 4


class SessionOutput(TypingProtocol):
    """What a session needs from the connection it is attached to."""

    @property
    def publisher(self) -> Publisher:
        """The connection's publisher side: never held back by its own session's queue."""

    def can_send(self) -> bool: ...

    def send_publish(
        self, message: Message, qos: int, retain: bool, dup: bool, packet_id: int | None
    ) -> None: ...

    def send_pubrel(self, packet_id: int) -> None: ...


#: An outgoing QoS 1/2 message in flight: (message, qos, retain, state, store seq). A plain
#: tuple, not an object: one is built per delivered message, and a tuple costs a
#: fraction of an instance's __init__. A state change replaces the whole tuple.
InFlight = tuple[Message, int, bool, int, int]
#: The state's place in an `InFlight` tuple.
_STATE = 3


def _is_qos0(meta: int) -> bool:
    return not meta & 3


class Session:
    """One client id's state; the router delivers to it whether or not it is connected."""

    __slots__ = (
        "client_id",
        "clean",
        "identity",
        "output",
        "inflight",
        "queue",
        "incoming_qos2",
        "subscriptions",
        "durable",
        "expires_at",
        "_entries",
        "_next_id",
        "_max_inflight",
        "_metrics",
        "_dropped_logged",
        "_store",
        "__weakref__",
    )

    def __init__(
        self,
        client_id: str,
        *,
        clean: bool,
        identity: Identity,
        max_inflight: int,
        limits: QueueLimits,
        budget: MemoryBudget,
        metrics: Metrics,
        store: Store | None = None,
    ) -> None:
        self.client_id = client_id
        self.clean = clean
        self.identity = identity
        self.output: SessionOutput | None = None
        # Insertion order is send order: redelivery on reconnect keeps it.
        self.inflight: dict[int, InFlight] = {}
        durable_store = store if store is not None and store.durable and not clean else None
        self.queue = MessageQueue(
            name=client_id, protocol=Protocol.MQTT, limits=limits, budget=budget, metrics=metrics,
            store=durable_store, key=KEY_PREFIX + client_id, qos0_meta=_is_qos0,
        )
        self.queue.on_refill(self.pump)
        self.durable = self.queue.durable
        self._entries = self.queue.entries
        self.incoming_qos2: set[int] = set()
        #: filter -> (granted qos, exclusions), as the router holds them.
        self.subscriptions: dict[str, tuple[int, tuple[str, ...]]] = {}
        #: Wall-clock time an offline persistent session is freed (None while connected).
        self.expires_at: float | None = None
        self._next_id = 0
        self._max_inflight = max_inflight
        self._metrics = metrics
        self._dropped_logged = 0
        self._store = durable_store

    # The router compares subscribers by identity; keep the default object hash/eq.

    def set_window(self, max_inflight: int) -> None:
        """QoS 1/2 deliveries in flight at once, for the connection attached now (an MQTT 5 receive maximum)."""
        self._max_inflight = max(1, max_inflight)

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        output = self.output
        queue = self.queue
        if output is not None and not self._entries and not queue.paged and output.can_send():
            if qos == 0:
                output.send_publish(message, 0, retain, False, None)
                return 0
            if len(self.inflight) < self._max_inflight:
                if self.durable:
                    seq = queue.persist(message, qos | (RETAIN_FLAG if retain else 0))
                    if not seq:
                        return REFUSED if publisher.refusable else 0  # out of numbers (counted, logged)
                    self._send_new(output, message, qos, retain, seq)
                    return STORED
                self._send_new(output, message, qos, retain, 0)
                return 0
        elif output is None and qos == 0:
            # MQTT 3.1.1 lets a broker discard QoS 0 for an offline session; count it.
            self._drop("offline_qos0")
            return 0
        # Never hold a connection back for its own session: its acks drain the queue.
        return queue.put(message, qos | (RETAIN_FLAG if retain else 0), publisher, persistent=qos > 0,
                         own=output is not None and publisher is output.publisher)

    def _drop(self, reason: str) -> None:
        self._metrics.dropped(Protocol.MQTT, reason)
        self._dropped_logged += 1
        count = self._dropped_logged
        # First drop and then every 1000th: visible without flooding the log.
        if count == 1 or count % 1000 == 0:
            log.warning(
                "dropped message for client %r: %s (%d dropped so far for this session)",
                self.client_id,
                reason,
                count,
                extra={"event": "message_dropped", "client_id": self.client_id, "reason": reason},
            )

    def _free_id_after(self, packet_id: int) -> int:
        """The next id after `packet_id` that is not in flight (ids wrapped around onto old ones)."""
        inflight = self.inflight
        for _ in range(65535):
            packet_id = packet_id + 1 if packet_id < 65535 else 1
            if packet_id not in inflight:
                return packet_id
        raise RuntimeError("no free packet id")  # unreachable: the window is < 65535

    def _send_new(self, output: SessionOutput, message: Message, qos: int, retain: bool, seq: int) -> None:
        """Give the message the next free packet id, put it in flight and send it."""
        inflight = self.inflight
        # Ids go up one by one, so the next one is almost always free.
        packet_id = self._next_id + 1 if self._next_id < 65535 else 1
        if packet_id in inflight:
            packet_id = self._free_id_after(packet_id)
        self._next_id = packet_id
        inflight[packet_id] = (message, qos, retain, WAIT_ACK if qos == 1 else WAIT_REC, seq)
        output.send_publish(message, qos, retain, False, packet_id)

    def pump(self) -> None:
        """Send queued messages while the window and the transport allow."""
        output = self.output
        if output is None:
            return
        queue = self.queue
        entries = self._entries
        inflight = self.inflight
        while entries and output.can_send():
            meta = entries[0][1]
            qos = meta & 3
            if qos and len(inflight) >= self._max_inflight:
                break
            message, meta, seq = queue.popleft()
            retain = bool(meta & RETAIN_FLAG)
            if qos == 0:
                output.send_publish(message, 0, retain, False, None)
                queue.settle(seq)  # a QoS 0 message is only stored while paged out
            else:
                self._send_new(output, message, qos, retain, seq)

    # -- acknowledgements from the client ---------------------------------------------------

    def puback(self, packet_id: int) -> bool:
        inflight = self.inflight
        entry = inflight.get(packet_id)
        if entry is None or entry[_STATE] != WAIT_ACK:
            return False
        del inflight[packet_id]
        if entry[4]:
            self.queue.settle(entry[4])
        if self._entries:
            self.pump()
        return True

    def pubrec(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None or entry[_STATE] == WAIT_ACK:
            return False
        # The message is the client's now; keep only the id until PUBCOMP. Assigning
        # to an existing key keeps its place, so redelivery order is unchanged.
        message, qos, retain, _state, seq = entry
        if seq:
            self.queue.settle(seq)
        self.inflight[packet_id] = (message, qos, retain, WAIT_COMP, 0)
        return True

    def pubcomp(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None or entry[_STATE] != WAIT_COMP:
            return False
        del self.inflight[packet_id]
        if self._entries:
            self.pump()
        return True

    # -- subscriptions ---------------------------------------------------------------------------

    def subscribe(self, router: Router, topic_filter: str, qos: int, exclusions: tuple[str, ...]) -> list[Message]:
        """Add a granted subscription; the retained messages it matches."""
        self.subscriptions[topic_filter] = (qos, exclusions)
        retained = router.subscribe(self, topic_filter, qos, exclusions)
        self.save()
        return retained

    def unsubscribe(self, router: Router, topic_filter: str) -> None:
        if self.subscriptions.pop(topic_filter, None) is not None:
            router.unsubscribe(self, topic_filter)
            self.save()

    # -- the store ---------------------------------------------------------------------------

    def save(self) -> None:
        """Write what the session is (identity, subscriptions, expiry) to the store."""
        if self._store is None:
            return
        identity = self.identity
        self._store.put_queue(self.queue.key, {
            "kind": "mqtt",
            "client_id": self.client_id,
            "identity": {"external_id": identity.external_id, "tenant": identity.tenant,
                         "username": identity.username, "superuser": identity.superuser},
            "subscriptions": {f: [qos, list(excl)] for f, (qos, excl) in self.subscriptions.items()},
            "expires_at": self.expires_at,
        })

    # -- attaching a connection ----------------------------------------------------------------

    def attach(self, output: SessionOutput) -> None:
        """A connection took this session: redeliver what is unacknowledged, then the queue."""
        self.output = output
        if self.expires_at is not None:
            self.expires_at = None
            self.save()
        for packet_id, (message, qos, retain, state, _seq) in self.inflight.items():
            if state == WAIT_COMP:
                output.send_pubrel(packet_id)
            else:
                output.send_publish(message, qos, retain, True, packet_id)
        self.pump()

    def detach(self, output: SessionOutput) -> None:
        if self.output is output:
            self.output = None
            self.queue.release_publishers()

    def drained(self) -> bool:
        """Nothing more to deliver, or nothing that a restart would lose (shutdown waits for this)."""
        return self.durable or (not self.queue and not any(e[_STATE] != WAIT_COMP for e in self.inflight.values()))


class SessionRegistry:
    """Every MQTT session of the gateway, by client id; shared by all MQTT listeners."""

    def __init__(self, router: Router, *, store: Store, limits: QueueLimits, metrics: Metrics,
                 max_inflight: int, session_expiry: float) -> None:
        self.router = router
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.session_expiry = session_expiry
        self.sessions: dict[str, Session] = {}
        #: The connection currently owning each client id (for takeover).
        self.owners: dict[str, object] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}

    def create(self, client_id: str, *, clean: bool, identity: Identity) -> Session:
        session = Session(
            client_id, clean=clean, identity=identity, max_inflight=self.max_inflight, limits=self.limits,
            budget=self.router.budget, metrics=self.metrics, store=self.store,
        )
        self.sessions[client_id] = session
        session.save()
        return session

    def connected(self, session: Session) -> None:
        timer = self._expiry.pop(session.client_id, None)
        if timer is not None:
            timer.cancel()

    def disconnected(self, session: Session) -> None:
        """A persistent session went offline: it is freed after mqtt.session_expiry."""
        if session.clean or self.sessions.get(session.client_id) is not session:
            return
        session.expires_at = time.time() + self.session_expiry
        session.save()
        self._schedule_expiry(session)

    def _schedule_expiry(self, session: Session) -> None:
        assert session.expires_at is not None
        loop = asyncio.get_running_loop()
        delay = max(0.0, session.expires_at - time.time())
        previous = self._expiry.pop(session.client_id, None)
        if previous is not None:
            previous.cancel()
        self._expiry[session.client_id] = loop.call_later(delay, self._expire, session)

    def _expire(self, session: Session) -> None:
        self._expiry.pop(session.client_id, None)
        if session.output is not None or self.sessions.get(session.client_id) is not session:
            return
        lost = len(session.queue) + len(session.inflight)
        log.info("session %r expired after %gs offline (mqtt.session_expiry)%s", session.client_id,
                 self.session_expiry, f"; {lost} undelivered message(s) freed" if lost else "",
                 extra={"event": "session_expired", "client_id": session.client_id})
        if lost:
            self.metrics.dropped(Protocol.MQTT, "session_expired", lost)
        self.discard(session)

    def discard(self, session: Session) -> None:
        """End a session: its subscriptions and queued messages go with it."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        timer = self._expiry.pop(session.client_id, None)
        if timer is not None:
            timer.cancel()
        self.router.unsubscribe_all(session)
        lost = len(session.queue) + sum(1 for entry in session.inflight.values() if entry[_STATE] != WAIT_COMP)
        if lost and not session.clean:
            log.info("discarded session %r with %d undelivered messages", session.client_id, lost)
        session.queue.clear()
        session.inflight.clear()
        if session.durable:
            session.durable = False
            session._store = None
            self.store.delete_queue(session.queue.key)

    def restore(self, stored: list[StoredQueue]) -> None:
        """Persistent sessions the store kept across a restart (before any listener opens)."""
        now = time.time()
        for queue in stored:
            meta: dict[str, Any] = queue.meta
            client_id = str(meta.get("client_id") or queue.key[len(KEY_PREFIX):])
            try:
                identity = Identity(**meta["identity"])
            except (KeyError, TypeError):
                log.error("stored MQTT session %r has no readable identity; it is dropped", client_id)
                self.store.delete_queue(queue.key)
                continue
            session = Session(
                client_id, clean=False, identity=identity, max_inflight=self.max_inflight, limits=self.limits,
                budget=self.router.budget, metrics=self.metrics, store=self.store,
            )
            session.queue.restore(queue)
            expires_at = meta.get("expires_at")
            # A session that was online when the gateway stopped is offline from now on.
            session.expires_at = float(expires_at) if expires_at is not None else now + self.session_expiry
            self.sessions[client_id] = session
            if session.expires_at <= now:
                self._expire(session)
                continue
            for topic_filter, (qos, exclusions) in dict(meta.get("subscriptions") or {}).items():
                session.subscriptions[topic_filter] = (int(qos), tuple(exclusions))
                self.router.subscribe(session, topic_filter, int(qos), tuple(exclusions))
            session.save()
            self._schedule_expiry(session)
        if stored:
            log.info("restored %d persistent MQTT session(s) from the store", len(self.sessions),
                     extra={"event": "sessions_restored"})
