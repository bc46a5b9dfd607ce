"""MQTT sessions: what outlives a connection when the client asked for it.

A `Session` is the router's subscriber. It holds the subscriptions (in the
router), the outgoing QoS 1/2 messages in flight, the queue of messages waiting
for a free in-flight slot or for the client to come back, and the packet ids of
incoming QoS 2 messages awaiting PUBREL. A connection attaches to a session
and detaches when it ends; a clean session dies with its connection.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from gateway.backpressure import Blocker, HeldPublishers, Publisher
from gateway.events import Protocol
from gateway.metrics import Metrics
from gateway.router import Message, Router

if TYPE_CHECKING:
    from gateway.events import Identity

log = logging.getLogger("polygate.mqtt")

#: Outgoing QoS 2 states: PUBLISH sent awaiting PUBREC, PUBREL sent awaiting PUBCOMP.
WAIT_ACK = 0  # QoS 1 PUBLISH sent, awaiting PUBACK
WAIT_REC = 1
WAIT_COMP = 2


class SessionOutput(TypingProtocol):
    """What a session needs from the connection it is attached to."""

    def can_send(self) -> bool: ...

    def throttle(self, blocker: Blocker) -> None:
        """Hold this connection's further PUBLISHes until `unthrottle` (backpressure)."""

    def unthrottle(self, blocker: Blocker) -> None: ...

    def send_publish(
        self, message: Message, qos: int, retain: bool, dup: bool, packet_id: int | None
    ) -> None: ...

    def send_pubrel(self, packet_id: int) -> None: ...


#: An outgoing QoS 1/2 message in flight: (message, qos, retain, state). A plain
#: tuple, not an object: one is built per delivered message, and a tuple costs a
#: fraction of an instance's __init__. A state change replaces the whole tuple.
InFlight = tuple[Message, int, bool, int]
#: The state's place in an `InFlight` tuple.
_STATE = 3


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
        "_next_id",
        "_max_inflight",
        "_max_queued",
        "_metrics",
        "_dropped_logged",
        "_flow",
        "_held",
        "_high_water",
        "_low_water",
        "__weakref__",
    )

    def __init__(
        self,
        client_id: str,
        *,
        clean: bool,
        identity: Identity,
        max_inflight: int,
        max_queued: int,
        metrics: Metrics,
        flow: FlowControl | None = None,
    ) -> None:
        self.client_id = client_id
        self.clean = clean
        self.identity = identity
        self.output: SessionOutput | None = None
        # Insertion order is send order: redelivery on reconnect keeps it.
        self.inflight: dict[int, InFlight] = {}
        self.queue: deque[tuple[Message, int, bool]] = deque()
        self.incoming_qos2: set[int] = set()
        self._next_id = 0
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._metrics = metrics
        self._dropped_logged = 0
        self._flow = flow
        #: Publishers held back because this session's queue is long (backpressure).
        self._held = HeldPublishers(self)
        self._high_water = max(1, max_queued // 2)
        self._low_water = max_queued // 4

    # The router compares subscribers by identity; keep the default object hash/eq.

    def deliver(self, message: Message, qos: int, retain: bool) -> None:
        output = self.output
        if output is not None and not self.queue and output.can_send():
            if qos == 0:
                output.send_publish(message, 0, retain, False, None)
                return
            if len(self.inflight) < self._max_inflight:
                self._send_new(output, message, qos, retain)
                return
        elif output is None and qos == 0:
            # MQTT 3.1.1 lets a broker discard QoS 0 for an offline session; count it.
            self._drop("offline_qos0")
            return
        if len(self.queue) >= self._max_queued:
            self._drop("queue_full")
            return
        self.queue.append((message, qos, retain))
        if output is not None and len(self.queue) >= self._high_water and self._flow is not None:
            self._hold_publisher(output)

    def _hold_publisher(self, output: SessionOutput) -> None:
        """Slow the connection whose PUBLISH is filling this queue, instead of dropping.

        Only an online session applies it (an offline one must not stall its
        publishers), and never to its own connection, whose acks drain the queue.
        """
        publisher = self._flow.current_publisher  # type: ignore[union-attr]
        if publisher is not None and publisher is not output:
            self._held.hold(publisher)

    def forget_publisher(self, publisher: Publisher) -> None:
        self._held.forget(publisher)

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

    def _send_new(self, output: SessionOutput, message: Message, qos: int, retain: bool) -> None:
        """Give the message the next free packet id, put it in flight and send it."""
        inflight = self.inflight
        # Ids go up one by one, so the next one is almost always free.
        packet_id = self._next_id + 1 if self._next_id < 65535 else 1
        if packet_id in inflight:
            packet_id = self._free_id_after(packet_id)
        self._next_id = packet_id
        inflight[packet_id] = (message, qos, retain, WAIT_ACK if qos == 1 else WAIT_REC)
        output.send_publish(message, qos, retain, False, packet_id)

    def pump(self) -> None:
        """Send queued messages while the window and the transport allow."""
        output = self.output
        if output is None:
            return
        queue = self.queue
        inflight = self.inflight
        while queue and output.can_send():
            message, qos, retain = queue[0]
            if qos == 0:
                queue.popleft()
                output.send_publish(message, 0, retain, False, None)
            elif len(inflight) < self._max_inflight:
                queue.popleft()
                self._send_new(output, message, qos, retain)
            else:
                break
        if self._held and len(queue) <= self._low_water:
            self._held.release_all()

    # -- acknowledgements from the client ---------------------------------------------------

    def puback(self, packet_id: int) -> bool:
        inflight = self.inflight
        entry = inflight.get(packet_id)
        if entry is None or entry[_STATE] != WAIT_ACK:
            return False
        del inflight[packet_id]
        if self.queue:
            self.pump()
        return True

    def pubrec(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None or entry[_STATE] == WAIT_ACK:
            return False
        # The message is the client's now; keep only the id until PUBCOMP. Assigning
        # to an existing key keeps its place, so redelivery order is unchanged.
        message, qos, retain, _state = entry
        self.inflight[packet_id] = (message, qos, retain, WAIT_COMP)
        return True

    def pubcomp(self, packet_id: int) -> bool:
        entry = self.inflight.get(packet_id)
        if entry is None or entry[_STATE] != WAIT_COMP:
            return False
        del self.inflight[packet_id]
        if self.queue:
            self.pump()
        return True

    # -- attaching a connection ----------------------------------------------------------------

    def attach(self, output: SessionOutput) -> None:
        """A connection took this session: redeliver what is unacknowledged, then the queue."""
        self.output = output
        for packet_id, (message, qos, retain, state) in self.inflight.items():
            if state == WAIT_COMP:
                output.send_pubrel(packet_id)
            else:
                output.send_publish(message, qos, retain, True, packet_id)
        self.pump()

    def detach(self, output: SessionOutput) -> None:
        if self.output is output:
            self.output = None
            self._held.release_all()


class FlowControl(TypingProtocol):
    #: The connection whose PUBLISH the router is delivering right now.
    current_publisher: SessionOutput | None


class SessionRegistry:
    """Every MQTT session of the gateway, by client id; shared by all MQTT listeners."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.sessions: dict[str, Session] = {}
        #: The connection currently owning each client id (for takeover).
        self.owners: dict[str, object] = {}
        #: Set around `router.publish` so a congested session knows whom to hold back.
        self.current_publisher: SessionOutput | None = None

    def discard(self, session: Session) -> None:
        """End a session: its subscriptions and queued messages go with it."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self.router.unsubscribe_all(session)
        lost = len(session.queue) + sum(1 for entry in session.inflight.values() if entry[_STATE] != WAIT_COMP)
        if lost and not session.clean:
            log.info("discarded session %r with %d undelivered messages", session.client_id, lost)
        session.queue.clear()
        session.inflight.clear()
        session._held.release_all()
