"""Queues, their owners and their bindings: the broker side of the AMQP 0.9.1 frontend.

Two exchanges exist: `amq.topic`, which is the gateway's router (a binding is
a router subscription of the queue), and the default exchange `""`, which
puts a message straight into the queue named by its routing key. Queues are
local to this gateway and shared by every AMQP 0.9.1 listener.

A queue belongs to the identity that declared it: another identity's
declare, consume, get, bind, unbind, purge, delete or default-exchange
publish is refused with 403 (superusers excepted, and nobody is checked when
auth is off for AMQP 0.9.1). An exclusive queue belongs to its connection:
any other connection gets 405 RESOURCE_LOCKED, except a default-exchange
publish (as in RabbitMQ, so RPC reply queues work).

Each queue's waiting messages live in a `gateway.queues.MessageQueue`: bounded
by `limits.max_queued_messages` and `max_queued_bytes` (or the queue
arguments `x-max-length` / `x-max-length-bytes`), with the overflow policy of
`limits.queue_overflow.amqp091` (or `x-overflow`: `reject-publish`,
`reject-publish-dlx`, `drop-head`, and this gateway's own `block`). A durable,
non-exclusive queue is kept in the store with its bindings, and so are its
persistent messages (delivery mode 2; QoS 1/2 messages from other protocols)
until a consumer acknowledges them.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

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
from gateway.backpressure import NO_PUBLISHER, Publisher
from gateway.events import Identity, Protocol
from gateway.message import Message
from gateway.metrics import Metrics
from gateway.queues import BLOCK, DROP_OLDEST, REFUSED, REJECT_NEW, STORED, MemoryBudget, MessageQueue, QueueLimits
from gateway.store.base import Store, StoredQueue, register_message_type

if TYPE_CHECKING:
    from gateway.amqp091.channel import Consumer
    from gateway.router import Router

log = logging.getLogger("polygate.amqp091")

DEFAULT_EXCHANGE = ""
#: Queues one identity may hold at once (declares beyond it get 406).
MAX_QUEUES_PER_OWNER = 1000
#: pamqp refuses to encode other names (the spec's queue-name domain).
QUEUE_NAME = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")
#: Store keys of durable queues start with this.
KEY_PREFIX = "amqp091:"
#: A ready message's meta int: set when it was delivered before (redelivered flag).
REDELIVERED = 1

#: x-overflow values (RabbitMQ's, and `block`) -> the gateway's policies.
X_OVERFLOW = {"reject-publish": REJECT_NEW, "reject-publish-dlx": REJECT_NEW, "drop-head": DROP_OLDEST, "block": BLOCK}

_ROUTER_EXCHANGE_KEYS: dict[str, bytes] = {}
_ROUTER_KEY_CACHE_SIZE = 10_000


class AMQPMessage(Message):
    """A message published over AMQP: it keeps its exchange, routing key and raw properties,
    so an AMQP consumer receives them unchanged; other protocols see a plain Message.
    Its qos is 1 for a persistent message (delivery mode 2), else 0."""

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


def _encode_extra(message: Message) -> bytes:
    assert isinstance(message, AMQPMessage)
    return len(message.exchange_key).to_bytes(4, "big") + message.exchange_key + message.properties


def _decode_extra(topic: str, payload: bytes, qos: int, retain: bool, extra: bytes) -> Message:
    size = int.from_bytes(extra[:4], "big")
    return AMQPMessage(topic, payload, qos, retain, exchange_key=extra[4:4 + size], properties=extra[4 + size:])


# The store keeps an AMQP message as itself, so a consumer after a restart gets its properties.
register_message_type(AMQPMessage, 1, _encode_extra, _decode_extra)


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


def queue_limits(defaults: QueueLimits, arguments: Mapping[str, Any]) -> QueueLimits:
    """The bound and policy of a queue: the gateway's, overridden by x-max-length, -bytes, x-overflow.

    Raises ChannelError 406 for a value RabbitMQ would refuse too.
    """
    max_messages, max_bytes, overflow = defaults.max_messages, defaults.max_bytes, defaults.overflow
    for name, value in arguments.items():
        if name in ("x-max-length", "x-max-length-bytes"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ChannelError(PRECONDITION_FAILED, f"invalid arg '{name}': {value!r} is not a non-negative integer")
            # 0 is a valid RabbitMQ length (nothing is kept); a queue here keeps at least one.
            if name == "x-max-length":
                max_messages = max(1, value)
            else:
                max_bytes = max(1, value)
        elif name == "x-overflow":
            text = value.decode() if isinstance(value, bytes) else value
            if text not in X_OVERFLOW:
                raise ChannelError(PRECONDITION_FAILED,
                                   f"invalid arg 'x-overflow': {text!r} is not one of {', '.join(X_OVERFLOW)}")
            overflow = X_OVERFLOW[text]
    return QueueLimits(max_messages, max_bytes, overflow)


def _known_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments this gateway acts on, as plain values (kept with a durable queue)."""
    known = {}
    for name in ("x-max-length", "x-max-length-bytes", "x-overflow"):
        if name in arguments:
            value = arguments[name]
            known[name] = value.decode() if isinstance(value, bytes) else value
    return known


class Queue:
    """One queue: waiting messages, consumers (round robin) and its amq.topic bindings."""

    __slots__ = (
        "name", "owner", "owner_connection", "durable", "exclusive", "auto_delete", "arguments", "ready",
        "consumers", "bindings", "had_consumer", "deleted", "_broker", "_next", "_entries", "__weakref__",
    )

    def __init__(self, broker: Broker, name: str, *, owner: str, owner_connection: object | None, durable: bool,
                 exclusive: bool, auto_delete: bool, arguments: Mapping[str, Any], limits: QueueLimits) -> None:
        self._broker = broker
        self.name = name
        self.owner = owner
        #: The connection an exclusive queue belongs to (None otherwise).
        self.owner_connection = owner_connection
        self.durable = durable
        self.exclusive = exclusive
        self.auto_delete = auto_delete
        self.arguments = dict(arguments)
        kept = durable and not exclusive
        self.ready = MessageQueue(
            name=name, protocol=Protocol.AMQP091, limits=limits, budget=broker.budget, metrics=broker.metrics,
            store=broker.store if kept else None, key=KEY_PREFIX + name,
        )
        self.ready.on_refill(self.dispatch)
        self._entries = self.ready.entries
        self.consumers: list[Consumer] = []
        #: Topic filters this queue is subscribed to on the router, with their exclusions.
        self.bindings: dict[str, tuple[str, ...]] = {}
        self.had_consumer = False
        self.deleted = False
        self._next = 0

    def __repr__(self) -> str:
        return f"Queue({self.name!r}, ready={len(self.ready)}, consumers={len(self.consumers)})"

    @property
    def kept(self) -> bool:
        """In the store (durable, not exclusive, and the store keeps anything)."""
        return self.ready.durable

    # -- messages in ------------------------------------------------------------------------------

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        """The router's entry point (a message matched one of this queue's bindings)."""
        if type(message) is not AMQPMessage and not short_str_fits(message.topic):
            # A routing key is a short string: a longer topic cannot be delivered over AMQP.
            self._broker.metrics.dropped(Protocol.AMQP091, "routing_key_too_long")
            return 0
        return self.put(message, publisher)

    def put(self, message: Message, publisher: Publisher = NO_PUBLISHER) -> int:
        """Queue a message and hand it to a consumer if one can take it; the router's status bits."""
        ready = self.ready
        consumers = self.consumers
        if not self._entries and not ready.paged and len(consumers) == 1:
            # The common case: nothing waits and the one consumer has room, so the
            # message goes straight out (kept in the store until acknowledged).
            consumer = consumers[0]
            if consumer.can_take():
                if ready.durable and message.qos and not consumer.no_ack:
                    seq = ready.persist(message, 0)
                    if not seq:
                        return REFUSED  # out of numbers (counted, logged)
                    consumer.channel.deliver(consumer, message, False, seq)
                    return STORED
                consumer.channel.deliver(consumer, message, False, 0)
                return 0
        # Never hold back a connection that consumes from this queue: its acks drain it.
        own = any(consumer.channel.output.publisher is publisher for consumer in consumers)
        status = ready.put(message, 0, publisher, persistent=message.qos > 0, own=own)
        if consumers and self._entries:
            self.dispatch()
        return status

    def requeue(self, entries: list[tuple[Message, int]]) -> None:
        """Unacknowledged messages go back to the front, in their original order, marked redelivered."""
        if self.deleted:
            self._broker.metrics.dropped(Protocol.AMQP091, "queue_deleted", len(entries))
            return
        ready = self.ready
        for message, seq in reversed(entries):
            # Already taken once: back in, even over the limits.
            ready.appendleft((message, REDELIVERED, seq))
        self.dispatch()

    def settle(self, seq: int) -> None:
        """A delivered message was acknowledged (or rejected without requeue)."""
        self.ready.settle(seq)

    def purge(self) -> int:
        return self.ready.purge()

    # -- messages out -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand ready messages to consumers while any can take one (prefetch, flow, socket)."""
        entries = self._entries
        consumers = self.consumers
        ready = self.ready
        if entries and consumers:
            if len(consumers) == 1:
                consumer = consumers[0]
                channel = consumer.channel
                while entries and consumer.can_take():
                    message, meta, seq = ready.popleft()
                    if consumer.no_ack and seq:
                        ready.settle(seq)
                        seq = 0
                    channel.deliver(consumer, message, bool(meta & REDELIVERED), seq)
            else:
                count = len(consumers)
                misses = 0
                while entries and misses < count:
                    consumer = consumers[self._next % count]
                    self._next += 1
                    if consumer.can_take():
                        message, meta, seq = ready.popleft()
                        if consumer.no_ack and seq:
                            ready.settle(seq)
                            seq = 0
                        consumer.channel.deliver(consumer, message, bool(meta & REDELIVERED), seq)
                        misses = 0
                    else:
                        misses += 1

    def pop(self) -> tuple[Message, bool, int] | None:
        """One message for basic.get: (message, redelivered, store seq)."""
        if not self._entries:
            return None
        message, meta, seq = self.ready.popleft()
        return message, bool(meta & REDELIVERED), seq

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
            self.ready.release_publishers()
            if self.auto_delete and not self.deleted:
                self._broker.delete(self)

    def has_exclusive_consumer(self) -> bool:
        return any(consumer.exclusive for consumer in self.consumers)

    def forget_publisher(self, publisher: Publisher) -> None:
        self.ready.forget_publisher(publisher)

    def drained(self) -> bool:
        """Nothing a restart would lose: empty, or everything waiting is in the store."""
        return not self.ready or (self.kept and all(seq for _, _, seq in self._entries))

    # -- the store --------------------------------------------------------------------------------

    def save(self) -> None:
        store = self._broker.store
        if not self.kept or store is None:
            return
        store.put_queue(self.ready.key, {
            "kind": "amqp091",
            "name": self.name,
            "owner": self.owner,
            "auto_delete": self.auto_delete,
            "arguments": self.arguments,
            "bindings": [[topic_filter, list(exclusions)] for topic_filter, exclusions in self.bindings.items()],
        })


class Broker:
    """Every AMQP 0.9.1 queue of the gateway, by name."""

    def __init__(self, *, router: Router, metrics: Metrics, limits: QueueLimits, check_owners: bool,
                 store: Store | None = None, budget: MemoryBudget | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.store = store
        self.budget = budget if budget is not None else router.budget
        self.queues: dict[str, Queue] = {}
        self.limits = limits
        self._check_owners = check_owners
        self._owned: Counter[str] = Counter()
        #: Told when the memory alarm turns on or off (connection.blocked / unblocked).
        self.alarm_listeners: set[Callable[[bool], None]] = set()
        self.budget.listeners.append(self._alarm)

    def _alarm(self, on: bool) -> None:
        for listener in list(self.alarm_listeners):
            listener(on)

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
                exclusive: bool, auto_delete: bool, arguments: Mapping[str, Any] | None = None) -> Queue:
        if passive:
            return self.find(name, identity, connection)
        arguments = _known_arguments(arguments or {})
        limits = queue_limits(self.limits, arguments)
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
            for arg in ("x-max-length", "x-max-length-bytes", "x-overflow"):
                if existing.arguments.get(arg) != arguments.get(arg):
                    raise ChannelError(
                        PRECONDITION_FAILED, f"inequivalent arg '{arg}' for queue '{name}': received "
                        f"{arguments.get(arg)!r} but current is {existing.arguments.get(arg)!r}")
            return existing
        if name.startswith("amq.") and not server_named:
            raise ChannelError(ACCESS_REFUSED, f"queue name '{name}' contains reserved prefix 'amq.*'")
        owner = identity.external_id
        if self._owned[owner] >= MAX_QUEUES_PER_OWNER:
            raise ChannelError(PRECONDITION_FAILED, f"queue limit reached ({MAX_QUEUES_PER_OWNER} per user)")
        queue = Queue(self, name, owner=owner, owner_connection=connection if exclusive else None, durable=durable,
                      exclusive=exclusive, auto_delete=auto_delete, arguments=arguments, limits=limits)
        self.queues[name] = queue
        self._owned[owner] += 1
        queue.save()
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
        kept = queue.kept
        count = queue.ready.clear()
        if kept and self.store is not None:
            self.store.delete_queue(queue.ready.key)
        return count

    def connection_closed(self, connection: object, exclusive: Iterable[Queue]) -> None:
        """An exclusive queue ends with the connection that declared it."""
        for queue in exclusive:
            if queue.owner_connection is connection:
                self.delete(queue)

    # -- bindings ---------------------------------------------------------------------------------

    def bind(self, queue: Queue, topic_filter: str, exclusions: tuple[str, ...] = ()) -> None:
        """Subscribe the queue (authorized by the caller); retained messages go in first."""
        if queue.bindings.get(topic_filter) == exclusions:
            return
        queue.bindings[topic_filter] = exclusions
        queue.save()
        for message in self.router.subscribe(queue, topic_filter, 1, exclusions):
            queue.put(message)

    def unbind(self, queue: Queue, topic_filter: str) -> None:
        if topic_filter in queue.bindings:
            del queue.bindings[topic_filter]
            self.router.unsubscribe(queue, topic_filter)
            queue.save()

    # -- restart ----------------------------------------------------------------------------------

    def restore(self, stored: list[StoredQueue]) -> None:
        """Durable queues the store kept across a restart, with their bindings and messages."""
        for kept in stored:
            meta = kept.meta
            name = str(meta.get("name") or kept.key[len(KEY_PREFIX):])
            arguments = dict(meta.get("arguments") or {})
            try:
                limits = queue_limits(self.limits, arguments)
            except ChannelError:
                limits = self.limits
            queue = Queue(self, name, owner=str(meta.get("owner", "")), owner_connection=None, durable=True,
                          exclusive=False, auto_delete=bool(meta.get("auto_delete")), arguments=arguments, limits=limits)
            queue.ready.restore(kept)
            self.queues[name] = queue
            self._owned[queue.owner] += 1
            for topic_filter, exclusions in meta.get("bindings") or []:
                queue.bindings[topic_filter] = tuple(exclusions)
                self.router.subscribe(queue, topic_filter, 1, tuple(exclusions))
        if stored:
            log.info("restored %d durable AMQP 0.9.1 queue(s) from the store", len(stored),
                     extra={"event": "queues_restored"})
