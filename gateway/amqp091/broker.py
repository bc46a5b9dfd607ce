"""Queues, their owners and their bindings: the broker side of the AMQP 0.9.1 frontend.

Two exchanges exist: `amq.topic`, which is the gateway's router (a binding is
a router subscription of the queue), and the default exchange `""`, which
puts a message straight into the queue named by its routing key. Queues live
in memory, local to this gateway, shared by every AMQP 0.9.1 listener.

A queue belongs to the identity that declared it: another identity's
declare, consume, get, bind, unbind, purge, delete or default-exchange
publish is refused with 403 (superusers excepted, and nobody is checked when
auth is off for AMQP 0.9.1). An exclusive queue belongs to its connection:
any other connection gets 405 RESOURCE_LOCKED, except a default-exchange
publish (as in RabbitMQ, so RPC reply queues work).

Each queue holds at most `limits.max_queued_messages` ready messages, and all
queues together at most MAX_QUEUED_BYTES of payload; beyond that a new
message is dropped and counted. A queue with consumers that fills
past half of that holds back the AMQP connection that is publishing into it
(the same scheme as MQTT sessions) until it drains to a quarter.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway.amqp091.framing import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    PROPERTIES_NONE,
    PROPERTIES_PERSISTENT,
    RESOURCE_LOCKED,
    ChannelError,
    exchange_and_key,
    short_str_fits,
)
from gateway.amqp091.routing import TOPIC_EXCHANGE, topic_to_routing_key
from gateway.backpressure import HeldPublishers, Publisher
from gateway.events import Identity, Protocol
from gateway.metrics import Metrics
from gateway.router import Message, Router

if TYPE_CHECKING:
    from gateway.amqp091.channel import Consumer

log = logging.getLogger("polygate.amqp091")

DEFAULT_EXCHANGE = ""
#: Queues one identity may hold at once (declares beyond it get 406).
MAX_QUEUES_PER_OWNER = 1000
#: Payload bytes waiting in all queues together; beyond it new messages are
#: dropped and counted ("memory_limit"), whatever each queue's own length.
MAX_QUEUED_BYTES = 256 * 1024 * 1024
#: pamqp refuses to encode other names (the spec's queue-name domain).
QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")

_ROUTER_EXCHANGE_KEYS: dict[str, bytes] = {}
_ROUTER_KEY_CACHE_SIZE = 10_000


class AMQPMessage(Message):
    """A message published over AMQP: it keeps its exchange, routing key and raw properties,
    so an AMQP consumer receives them unchanged; other protocols see a plain Message."""

    __slots__ = ("exchange_key", "properties")

    exchange_key: bytes
    properties: bytes

    # The base signature stays valid (dataclasses.replace builds copies through it).
    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *, exchange_key: bytes = b"",
                 properties: bytes = PROPERTIES_NONE) -> None:
        Message.__init__(self, topic, payload, qos, retain)
        _set_exchange_key(self, exchange_key)
        _set_properties(self, properties)


_set_exchange_key = AMQPMessage.__dict__["exchange_key"].__set__
_set_properties = AMQPMessage.__dict__["properties"].__set__


def envelope(message: Message) -> tuple[bytes, bytes]:
    """(encoded exchange + routing key, raw properties) to deliver `message` with."""
    if type(message) is AMQPMessage and message.exchange_key:
        return message.exchange_key, message.properties
    topic = message.topic
    exchange_key = _ROUTER_EXCHANGE_KEYS.get(topic)
    if exchange_key is None:
        exchange_key = exchange_and_key(TOPIC_EXCHANGE, topic_to_routing_key(topic))
        if len(_ROUTER_EXCHANGE_KEYS) >= _ROUTER_KEY_CACHE_SIZE:
            _ROUTER_EXCHANGE_KEYS.clear()
        _ROUTER_EXCHANGE_KEYS[topic] = exchange_key
    # QoS 1/2 messages from other protocols arrive as persistent (delivery-mode 2).
    return exchange_key, PROPERTIES_PERSISTENT if message.qos else PROPERTIES_NONE


class Queue:
    """One queue: ready messages, consumers (round robin) and its amq.topic bindings."""

    __slots__ = (
        "name", "owner", "owner_connection", "durable", "exclusive", "auto_delete", "ready", "consumers",
        "bindings", "had_consumer", "deleted", "_broker", "_next", "_max", "_high_water", "_low_water",
        "_held", "_dropped",
    )

    def __init__(self, broker: Broker, name: str, *, owner: str, owner_connection: object | None,
                 durable: bool, exclusive: bool, auto_delete: bool, max_queued: int) -> None:
        self._broker = broker
        self.name = name
        self.owner = owner
        #: The connection an exclusive queue belongs to (None otherwise).
        self.owner_connection = owner_connection
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.ready: deque[tuple[Message, bool]] = deque()
        self.consumers: list[Consumer] = []
        #: Topic filters this queue is subscribed to on the router (from binding keys).
        self.bindings: set[str] = set()
        self.had_consumer = False
        self.deleted = False
        self._next = 0
        self._max = max_queued
        self._high_water = max(1, max_queued // 2)
        self._low_water = max_queued // 4
        self._held = HeldPublishers(self)
        self._dropped = 0

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, ready={len(self.ready)}, consumers={len(self.consumers)})"

    # -- messages in ------------------------------------------------------------------------------

    def deliver(self, message: Message, qos: int, retain: bool) -> None:
        """The router's entry point (a message matched one of this queue's bindings)."""
        if type(message) is not AMQPMessage and not short_str_fits(message.topic):
            # A routing key is a short string: a longer topic cannot be delivered over AMQP.
            self._drop("routing_key_too_long")
            return
        self.put(message)

    def put(self, message: Message) -> bool:
        """Queue a message and hand it to a consumer if one can take it; False when dropped."""
        ready = self.ready
        consumers = self.consumers
        if not ready and len(consumers) == 1:
            # The common case: nothing waits and the one consumer has room, so the
            # message goes straight out (held publishers were released when it emptied).
            consumer = consumers[0]
            if consumer.can_take():
                consumer.channel.deliver(consumer, message, False)
                return True
        if len(ready) >= self._max:
            self._drop("queue_full")
            return False
        broker = self._broker
        size = len(message.payload)
        if broker.queued_bytes + size > broker.max_queued_bytes:
            self._drop("memory_limit")
            return False
        broker.queued_bytes += size
        ready.append((message, False))
        if consumers:
            self.dispatch()
            if len(ready) >= self._high_water:
                self._hold_publisher()
        return True

    def requeue(self, messages: list[Message]) -> None:
        """Unacknowledged messages go back to the front, in their original order, marked redelivered."""
        if self.deleted:
            self._broker.metrics.dropped(Protocol.AMQP091, "queue_deleted", len(messages))
            return
        ready = self.ready
        for message in reversed(messages):
            # Already accepted once: back in, even over the limits.
            self._broker.queued_bytes += len(message.payload)
            ready.appendleft((message, True))
        self.dispatch()

    def purge(self) -> int:
        count = len(self.ready)
        self._clear()
        self._release_publishers()
        return count

    def _clear(self) -> None:
        self._broker.queued_bytes -= sum(len(message.payload) for message, _ in self.ready)
        self.ready.clear()

    def _drop(self, reason: str) -> None:
        self._broker.metrics.dropped(Protocol.AMQP091, reason)
        self._dropped += 1
        count = self._dropped
        # First drop and then every 1000th: visible without flooding the log.
        if count == 1 or count % 1000 == 0:
            log.warning("dropped message for queue %r: %s (%d dropped so far for this queue)", self.name, reason, count,
                        extra={"event": "message_dropped", "queue": self.name, "reason": reason})

    # -- messages out -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand ready messages to consumers while any can take one (prefetch, flow, socket)."""
        ready = self.ready
        consumers = self.consumers
        if ready and consumers:
            if len(consumers) == 1:
                consumer = consumers[0]
                channel = consumer.channel
                broker = self._broker
                while ready and consumer.can_take():
                    message, redelivered = ready.popleft()
                    broker.queued_bytes -= len(message.payload)
                    channel.deliver(consumer, message, redelivered)
            else:
                count = len(consumers)
                misses = 0
                while ready and misses < count:
                    consumer = consumers[self._next % count]
                    self._next += 1
                    if consumer.can_take():
                        message, redelivered = ready.popleft()
                        self._broker.queued_bytes -= len(message.payload)
                        consumer.channel.deliver(consumer, message, redelivered)
                        misses = 0
                    else:
                        misses += 1
        if self._held and len(ready) <= self._low_water:
            self._release_publishers()

    def pop(self) -> tuple[Message, bool] | None:
        """One message for basic.get."""
        if not self.ready:
            return None
        entry = self.ready.popleft()
        self._broker.queued_bytes -= len(entry[0].payload)
        if self._held and len(self.ready) <= self._low_water:
            self._release_publishers()
        return entry

    # -- consumers --------------------------------------------------------------------------------

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        self.had_consumer = True
        self.dispatch()

    def remove_consumer(self, consumer: Consumer) -> None:
        """Drop a consumer; an auto-delete queue goes with its last one."""
        try:
            self.consumers.remove(consumer)
        except ValueError:
            return
        if not self.consumers:
            self._release_publishers()
            if self.auto_delete and not self.deleted:
                self._broker.delete(self)

    def has_exclusive_consumer(self) -> bool:
        return any(consumer.exclusive for consumer in self.consumers)

    # -- backpressure -------------------------------------------------------------------------------

    def _hold_publisher(self) -> None:
        """Slow the AMQP connection filling this queue, never one that consumes from it
        (its acks are what drains the queue)."""
        publisher = self._broker.current_publisher
        if publisher is None:
            return
        for consumer in self.consumers:
            if consumer.channel.output is publisher:
                return
        self._held.hold(publisher)

    def forget_publisher(self, publisher: Publisher) -> None:
        self._held.forget(publisher)

    def _release_publishers(self) -> None:
        self._held.release_all()


class Broker:
    """Every AMQP 0.9.1 queue of the gateway, by name."""

    def __init__(self, *, router: Router, metrics: Metrics, max_queued: int, check_owners: bool) -> None:
        self.router = router
        self.metrics = metrics
        self.queues: dict[str, Queue] = {}
        #: Set around a publish so a congested queue knows whom to hold back.
        self.current_publisher: Publisher | None = None
        self._max_queued = max_queued
        self._check_owners = check_owners
        self._owned: Counter[str] = Counter()
        #: Payload bytes in every queue's ready messages (see MAX_QUEUED_BYTES).
        self.queued_bytes = 0
        self.max_queued_bytes = MAX_QUEUED_BYTES

    # -- access rules -----------------------------------------------------------------------------

    def check_access(self, queue: Queue, identity: Identity, connection: object, *, publish: bool = False) -> None:
        """Raise the channel error AMQP and DESIGN.md prescribe for using another's queue."""
        if queue.exclusive and queue.owner_connection is not connection and not publish:
            raise ChannelError(RESOURCE_LOCKED,
                               f"cannot obtain exclusive access to locked queue '{queue.name}'")
        if self._check_owners and not identity.superuser and queue.owner != identity.external_id:
            raise ChannelError(ACCESS_REFUSED, f"queue '{queue.name}' belongs to another user")

    def find(self, name: str, identity: Identity, connection: object, *, publish: bool = False) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise ChannelError(NOT_FOUND, f"no queue '{name}'")
        self.check_access(queue, identity, connection, publish=publish)
        return queue

    # -- declare / delete -------------------------------------------------------------------------

    def declare(self, name: str, *, identity: Identity, connection: object, passive: bool, durable: bool,
                exclusive: bool, auto_delete: bool) -> Queue:
        if passive:
            return self.find(name, identity, connection)
        server_named = not name
        if server_named:
            name = f"amq.gen-{secrets.token_urlsafe(16)}"
        elif len(name.encode("utf-8")) > 255 or not QUEUE_NAME.fullmatch(name):
            raise ChannelError(PRECONDITION_FAILED,
                               f"queue name {name[:64]!r} must be at most 255 bytes of letters, digits and -_.:@#,/+ space")
        existing = self.queues.get(name)
        if existing is not None:
            self.check_access(existing, identity, connection)
            for arg, have, want in (("durable", existing.durable, durable), ("exclusive", existing.exclusive, exclusive),
                                    ("auto_delete", existing.auto_delete, auto_delete)):
                if have != want:
                    raise ChannelError(PRECONDITION_FAILED,
                                       f"inequivalent arg '{arg}' for queue '{name}': received {want} but current is {have}")
            return existing
        if name.startswith("amq.") and not server_named:
            raise ChannelError(ACCESS_REFUSED, f"queue name '{name}' contains reserved prefix 'amq.*'")
        owner = identity.external_id
        if self._owned[owner] >= MAX_QUEUES_PER_OWNER:
            raise ChannelError(PRECONDITION_FAILED, f"queue limit reached ({MAX_QUEUES_PER_OWNER} per user)")
        queue = Queue(self, name, owner=owner, owner_connection=connection if exclusive else None, durable=durable,
                      exclusive=exclusive, auto_delete=auto_delete, max_queued=self._max_queued)
        self.queues[name] = queue
        self._owned[owner] += 1
        return queue

    def delete(self, queue: Queue) -> int:
        """Remove a queue with its bindings; its consumers are cancelled. Returns the ready count lost."""
        if queue.deleted:
            return 0
        queue.deleted = True
        if self.queues.get(queue.name) is queue:
            del self.queues[queue.name]
        self._owned[queue.owner] -= 1
        if self._owned[queue.owner] <= 0:
            del self._owned[queue.owner]
        self.router.unsubscribe_all(queue)
        queue.bindings.clear()
        consumers = list(queue.consumers)
        queue.consumers.clear()
        for consumer in consumers:
            consumer.channel.consumer_cancelled(consumer)
        count = len(queue.ready)
        queue._clear()
        queue._release_publishers()
        return count

    def connection_closed(self, connection: object, exclusive: Iterable[Queue]) -> None:
        """An exclusive queue ends with the connection that declared it."""
        for queue in exclusive:
            if queue.owner_connection is connection:
                self.delete(queue)

    # -- bindings ---------------------------------------------------------------------------------

    def bind(self, queue: Queue, topic_filter: str) -> None:
        """Subscribe the queue (authorized by the caller); retained messages go in first."""
        if topic_filter in queue.bindings:
            return
        queue.bindings.add(topic_filter)
        for message in self.router.subscribe(queue, topic_filter, 1):
            queue.deliver(message, message.qos, True)

    def unbind(self, queue: Queue, topic_filter: str) -> None:
        if topic_filter in queue.bindings:
            queue.bindings.discard(topic_filter)
            self.router.unsubscribe(queue, topic_filter)
