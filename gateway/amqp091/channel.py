"""One AMQP 0.9.1 channel: its consumers, unacknowledged deliveries, prefetch and confirms.

No I/O: a channel writes frames through its `ChannelOutput` (the connection,
which gathers writes). Deliveries to consumers that acknowledge are
at-least-once: anything unacknowledged when the channel or the connection
closes goes back to the front of its queue, marked redelivered.

Prefetch follows RabbitMQ: `basic.qos(global=False)` limits each consumer
started afterwards, `global=True` the whole channel. A channel never holds
more than `MAX_UNACKED` unacknowledged deliveries, whatever the prefetch, so
a client that never acknowledges cannot make the gateway's memory grow.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from pamqp import commands

from gateway.amqp091.broker import AMQPMessage, Broker, Queue, envelope
from gateway.amqp091.framing import (
    PRECONDITION_FAILED,
    ChannelError,
    deliver_prefix,
    encode_basic_ack,
    encode_deliver,
    encode_get_ok,
    encode_method,
)
from gateway.backpressure import Publisher
from gateway.events import Protocol
from gateway.message import Message

if TYPE_CHECKING:
    from gateway.metrics import Metrics

#: Unacknowledged deliveries one channel may hold (also the cap under prefetch 0).
MAX_UNACKED = 65536

#: What a channel keeps per unacknowledged delivery: where it came from, who got it, its store seq.
_Unacked = tuple[Queue, Message, "Consumer | None", int]


class ChannelOutput(TypingProtocol):
    """What a channel needs from its connection."""

    frame_max: int
    #: The client handles a server-sent basic.cancel (capability consumer_cancel_notify).
    consumer_cancel_notify: bool
    @property
    def publisher(self) -> Publisher:
        """The connection as a publisher (never held back by a queue it consumes from)."""

    def write(self, data: bytes) -> None: ...

    def can_send(self) -> bool: ...

    def confirm_pending(self, channel: Channel) -> None:
        """The channel has publisher confirms to send at the next flush."""


class Consumer:
    __slots__ = ("tag", "channel", "queue", "no_ack", "exclusive", "prefetch", "unacked", "prefix")

    def __init__(self, tag: str, channel: Channel, queue: Queue, *, no_ack: bool, exclusive: bool,
                 prefetch: int) -> None:
        self.tag = tag
        self.channel = channel
        self.queue = queue
        self.no_ack = no_ack
        self.exclusive = exclusive
        self.prefetch = prefetch
        self.unacked = 0
        self.prefix = deliver_prefix(tag)

    def can_take(self) -> bool:
        channel = self.channel
        if not channel.flow or channel.closing or not channel.output.can_send():
            return False
        if self.no_ack:
            return True
        if self.prefetch and self.unacked >= self.prefetch:
            return False
        return len(channel.unacked) < channel.unacked_limit

    def __repr__(self) -> str:
        return f"Consumer({self.tag!r}, queue={self.queue.name!r}, unacked={self.unacked})"


class Channel:
    __slots__ = (
        "number", "output", "broker", "consumers", "unacked", "next_tag", "prefetch_count", "unacked_limit",
        "confirm", "publish_seq", "confirm_upto", "confirm_sent", "nacked", "flow", "closing", "last_queue",
        "_metrics_out",
    )

    def __init__(self, number: int, output: ChannelOutput, broker: Broker, metrics: Metrics) -> None:
        self.number = number
        self.output = output
        self.broker = broker
        self.consumers: dict[str, Consumer] = {}
        # Ordered by delivery tag: `multiple` acks pop from the front in O(1).
        self.unacked: OrderedDict[int, _Unacked] = OrderedDict()
        self.next_tag = 0
        #: basic.qos(global=False): the prefetch of consumers started from now on.
        self.prefetch_count = 0
        #: basic.qos(global=True) (or MAX_UNACKED): unacknowledged deliveries on the whole channel.
        self.unacked_limit = MAX_UNACKED
        self.confirm = False
        self.publish_seq = 0
        self.confirm_upto = 0
        self.confirm_sent = 0
        #: Publish sequence numbers up to confirm_upto that get basic.nack (a full queue refused them).
        self.nacked: list[int] = []
        #: channel.flow from the client: False stops deliveries.
        self.flow = True
        #: The server sent channel.close and waits for close-ok; everything else is ignored.
        self.closing = False
        #: The last queue declared on this channel ("" in a method means this one).
        self.last_queue = ""
        self._metrics_out = metrics.messages_out

    @property
    def active(self) -> bool:
        return self.flow and not self.closing

    # -- deliveries -----------------------------------------------------------------------------------

    def deliver(self, consumer: Consumer, message: Message, redelivered: bool, seq: int) -> None:
        tag = self.next_tag = self.next_tag + 1
        if not consumer.no_ack:
            self.unacked[tag] = (consumer.queue, message, consumer, seq)
            consumer.unacked += 1
        if type(message) is AMQPMessage and message.exchange_key:
            exchange_key, properties = message.exchange_key, message.properties
        else:
            exchange_key, properties = envelope(message)
        output = self.output
        output.write(encode_deliver(self.number, consumer.prefix, tag, redelivered, exchange_key, properties,
                                    message.payload, output.frame_max))
        self._metrics_out[Protocol.AMQP091] += 1

    def get(self, queue: Queue, no_ack: bool) -> None:
        """basic.get: one message with get-ok, or get-empty."""
        entry = queue.pop()
        output = self.output
        if entry is None:
            output.write(encode_method(self.number, commands.Basic.GetEmpty()))
            return
        message, redelivered, seq = entry
        tag = self.next_tag = self.next_tag + 1
        if no_ack:
            queue.settle(seq)
        else:
            self.unacked[tag] = (queue, message, None, seq)
        exchange_key, properties = envelope(message)
        output.write(encode_get_ok(self.number, tag, redelivered, exchange_key, len(queue.ready), properties,
                                   message.payload, output.frame_max))
        self._metrics_out[Protocol.AMQP091] += 1

    def refill(self) -> None:
        """Capacity came back (acks, qos, flow, a drained socket): let the queues send again."""
        for consumer in tuple(self.consumers.values()):
            if consumer.queue.ready.entries:
                consumer.queue.dispatch()

    # -- acknowledgements --------------------------------------------------------------------------

    def _take(self, delivery_tag: int, multiple: bool) -> list[_Unacked]:
        unacked = self.unacked
        if multiple:
            if delivery_tag and delivery_tag not in unacked and (not unacked or delivery_tag < next(iter(unacked))):
                raise ChannelError(PRECONDITION_FAILED, f"unknown delivery tag {delivery_tag}")
            taken: list[_Unacked] = []
            while unacked:
                first = next(iter(unacked))
                if delivery_tag and first > delivery_tag:
                    break
                taken.append(unacked.popitem(last=False)[1])
            return taken
        return [self._take_one(delivery_tag)]

    def _take_one(self, delivery_tag: int) -> _Unacked:
        entry = self.unacked.pop(delivery_tag, None)
        if entry is None:
            raise ChannelError(PRECONDITION_FAILED, f"unknown delivery tag {delivery_tag}")
        return entry

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        # One tag per ack is what most consumers send: no list of one for it.
        for queue, _, consumer, seq in self._take(delivery_tag, True) if multiple else (self._take_one(delivery_tag),):
            if consumer is not None:
                consumer.unacked -= 1
            if seq:
                queue.settle(seq)
        self.refill()

    def nack(self, delivery_tag: int, multiple: bool, requeue: bool) -> None:
        """basic.nack / basic.reject: requeue (redelivered) or drop."""
        entries = self._take(delivery_tag, multiple)
        for queue, _, consumer, seq in entries:
            if consumer is not None:
                consumer.unacked -= 1
            if not requeue and seq:
                queue.settle(seq)
        if requeue:
            _requeue(entries)
        else:
            self.broker.metrics.dropped(Protocol.AMQP091, "rejected", len(entries))
        self.refill()

    def recover(self) -> None:
        """basic.recover(requeue=True): everything unacknowledged goes back to its queue."""
        entries = list(self.unacked.values())
        self.unacked.clear()
        for consumer in self.consumers.values():
            consumer.unacked = 0
        _requeue(entries)
        self.refill()

    # -- consumers -------------------------------------------------------------------------------------

    def consume(self, queue: Queue, tag: str, *, no_ack: bool, exclusive: bool) -> Consumer:
        consumer = Consumer(tag, self, queue, no_ack=no_ack, exclusive=exclusive, prefetch=self.prefetch_count)
        self.consumers[tag] = consumer
        queue.add_consumer(consumer)
        return consumer

    def cancel(self, tag: str) -> bool:
        consumer = self.consumers.pop(tag, None)
        if consumer is None:
            return False
        consumer.queue.remove_consumer(consumer)
        return True

    def consumer_cancelled(self, consumer: Consumer) -> None:
        """The queue went away under the consumer: tell the client when it listens for that."""
        if self.consumers.get(consumer.tag) is not consumer:
            return
        del self.consumers[consumer.tag]
        if self.output.consumer_cancel_notify and not self.closing:
            self.output.write(encode_method(self.number, commands.Basic.Cancel(consumer_tag=consumer.tag, nowait=True)))

    # -- publisher confirms --------------------------------------------------------------------------

    def confirmed(self, seq: int, ok: bool = True) -> None:
        """Publish `seq` was handled: taken (ack) or refused by a full queue (nack), sent at the next flush.

        Outcomes arrive in publish order (the connection's AckOrder keeps it).
        """
        if not ok:
            self.nacked.append(seq)
        self.confirm_upto = seq
        self.output.confirm_pending(self)

    def confirm_frames(self) -> bytes:
        """basic.ack (multiple) for every publish handled since the last, basic.nack for each refused one."""
        upto = self.confirm_upto
        sent = self.confirm_sent
        if upto <= sent:
            return b""
        self.confirm_sent = upto
        if not self.nacked:
            return encode_basic_ack(self.number, upto, upto - sent > 1)
        frames = []
        for seq in self.nacked:
            if seq - 1 > sent:
                frames.append(encode_basic_ack(self.number, seq - 1, seq - 1 - sent > 1))
            frames.append(encode_method(self.number, commands.Basic.Nack(delivery_tag=seq, multiple=False, requeue=False)))
            sent = seq
        self.nacked.clear()
        if upto > sent:
            frames.append(encode_basic_ack(self.number, upto, upto - sent > 1))
        return b"".join(frames)

    # -- closing -----------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """The channel ends: consumers go, unacknowledged messages return to their queues."""
        self.closing = True
        consumers = list(self.consumers.values())
        self.consumers.clear()
        entries = list(self.unacked.values())
        self.unacked.clear()
        for consumer in consumers:
            consumer.queue.remove_consumer(consumer)
        _requeue(entries)


def _requeue(entries: list[_Unacked]) -> None:
    """Return messages to the front of their queues, each queue keeping delivery order."""
    by_queue: dict[int, tuple[Queue, list[tuple[Message, int]]]] = {}
    for queue, message, _, seq in entries:
        slot = by_queue.get(id(queue))
        if slot is None:
            by_queue[id(queue)] = (queue, [(message, seq)])
        else:
            slot[1].append((message, seq))
    for queue, messages in by_queue.values():
        queue.requeue(messages)
