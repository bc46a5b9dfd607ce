"""Subscriber queues: one bound, one overflow policy and one durability rule for every protocol.

Every subscriber (an MQTT session, an AMQP 0.9.1 queue, an AMQP 1.0 link,
an SSE stream, a CoAP observer) keeps the messages it cannot send yet in a
`MessageQueue`. Its owner decides what to send and when; the queue decides
what happens when it is full, what is written to the store, and what a
publish into it means for the publisher, as a status the router collects:

- `STORED`: the message was written to the store; its acknowledgement waits
  until the store commits (`Store.when_committed`).
- `REFUSED`: the queue refused it (`reject_new`); the publisher is told where
  its protocol can say so (`Publisher.refusable`).

Policies when `limits.max_queued_messages` or `max_queued_bytes` is reached:
- `drop_oldest`: the oldest waiting message goes (a QoS 0 one among the
  oldest first), the new one is taken. The publisher never waits.
- `reject_new`: the new message is refused. A publisher that cannot be told
  (MQTT 3.1.1 QoS 1/2) is held instead, so nothing it was acknowledged is lost.
- `block`: the message is taken and its publisher is held until the queue has
  drained to half its bound.
Every overflow is counted (`polygate_queue_overflows`) and logged (the first
and every 1000th per queue); every message lost is counted as dropped.

A durable queue (a persistent MQTT session, a durable AMQP 0.9.1 queue) writes
its persistent messages to the store and removes them when they are
acknowledged; it keeps at most `window` messages in memory and pages the rest
out to the store, reading them back in order as it drains, so a queue can be
larger than memory. Messages in memory, all queues together, count against
the memory watermark (`MemoryBudget`): above it every publisher is held.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.backpressure import NO_PUBLISHER, HeldPublishers, Publisher
from gateway.config_types import LimitsConfig
from gateway.events import Protocol
from gateway.message import Message
from gateway.metrics import Metrics
from gateway.store.base import Store, StoredEntry, StoredQueue

log = logging.getLogger("polygate.queues")

#: Status bits of a delivery (a subscriber's `deliver`) and of a publish (the router's, OR-ed).
STORED = 2
REFUSED = 4

DROP_OLDEST, REJECT_NEW, BLOCK = "drop_oldest", "reject_new", "block"
#: Rough bytes a queued message costs in memory beyond its payload and topic (objects, deque slot).
MESSAGE_OVERHEAD = 200
#: Messages a durable queue keeps in memory; the rest wait in the store.
DEFAULT_WINDOW = 10_000
#: drop_oldest looks this far from the head for a QoS 0 message to drop first.
QOS0_SCAN = 64
#: The first overflow and every this many are logged, per queue.
LOG_EVERY = 1000

#: (message, owner's meta int, sequence number in the store or 0)
Entry = tuple[Message, int, int]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_messages: int
    max_bytes: int
    overflow: str

    def __post_init__(self) -> None:
        if self.overflow not in (DROP_OLDEST, REJECT_NEW, BLOCK):
            raise ValueError(f"unknown overflow policy {self.overflow!r}")
        if self.max_messages < 1 or self.max_bytes < 1:
            raise ValueError("queue bounds must be at least 1")


def limits_for(limits: LimitsConfig, protocol: Protocol) -> QueueLimits:
    """The configured bound and overflow policy of a subscriber queue of `protocol`."""
    return QueueLimits(limits.max_queued_messages, limits.max_queued_bytes, limits.queue_overflow[protocol])


class MemoryBudget:
    """Bytes held by queued messages in memory, all queues together, against the watermark.

    Above `high` the alarm is on: the router holds every publisher it routes
    for, and `on_change` listeners hear it (AMQP 0.9.1 connection.blocked).
    It goes off below 90% of `high`.
    """

    __slots__ = ("used", "high", "low", "alarm", "held", "listeners", "messages", "paged", "transient")

    def __init__(self, high: int) -> None:
        self.used = 0
        self.high = high
        self.low = high - high // 10
        self.alarm = False
        self.held = HeldPublishers(self)
        self.listeners: list[Callable[[bool], None]] = []
        #: Messages queued in memory and paged out to the store, for /metrics.
        self.messages = 0
        self.paged = 0
        #: Messages queued in memory only (not in the store): what a stop would lose.
        self.transient = 0

    def add(self, size: int) -> None:
        self.used += size
        if self.high and not self.alarm and self.used > self.high:
            self.alarm = True
            log.warning("queued messages use %d bytes, above limits.memory_high_watermark (%d): every publisher "
                        "is held until consumers catch up", self.used, self.high, extra={"event": "memory_alarm"})
            self._tell(True)

    def sub(self, size: int) -> None:
        self.used -= size
        if self.alarm and self.used < self.low:
            self.alarm = False
            log.warning("queued messages are back under the memory watermark; publishers flow again",
                        extra={"event": "memory_alarm_cleared"})
            self.held.release_all()
            self._tell(False)

    def _tell(self, alarm: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(alarm)
            except Exception:
                log.exception("a memory alarm listener failed")

    def forget_publisher(self, publisher: Publisher) -> None:
        self.held.forget(publisher)


def _size(message: Message) -> int:
    return len(message.payload) + len(message.topic) + MESSAGE_OVERHEAD


class MessageQueue:
    """The waiting messages of one subscriber, bounded, with its overflow policy and durability.

    `entries` is public so owners can test it for emptiness on their hot path;
    change it only through the methods. `key` names the queue in the store
    (durable queues only).
    """

    __slots__ = (
        "name", "protocol", "limits", "entries", "bytes", "paged", "durable", "key", "_store", "_budget",
        "_metrics", "_window", "_next_seq", "_rows", "_page_from", "_paged_bytes", "_reading", "_read_epoch",
        "_skip", "_held", "_overflows", "_on_refill", "_qos0", "__weakref__",
    )

    def __init__(
        self,
        *,
        name: str,
        protocol: Protocol,
        limits: QueueLimits,
        budget: MemoryBudget,
        metrics: Metrics,
        store: Store | None = None,
        key: str = "",
        window: int = DEFAULT_WINDOW,
        qos0_meta: Callable[[int], bool] | None = None,
    ) -> None:
        self.name = name
        self.protocol = protocol
        self.limits = limits
        self.entries: deque[Entry] = deque()
        #: Payload bytes waiting (in memory and paged out), against limits.max_bytes.
        self.bytes = 0
        #: Messages waiting in the store only (paged out), after the entries in memory: the rows
        #: numbered after `_page_from` (not always consecutively: a restore may leave gaps).
        self.paged = 0
        self.durable = bool(store is not None and store.durable and key)
        self.key = key
        self._store = store
        self._budget = budget
        self._metrics = metrics
        self._window = max(2, window)
        self._next_seq = 0
        #: Rows this queue has in the store (waiting, paged, or delivered and not yet settled).
        self._rows = 0
        self._page_from = 0
        self._paged_bytes = 0
        self._reading = False
        #: Bumped when the paged part is thrown away or renumbered, so a read asked for before is ignored.
        self._read_epoch = 0
        #: Paged-out messages dropped (drop_oldest) before they were read back: the next read
        #: removes that many of its first rows instead of queueing them.
        self._skip = 0
        self._held = HeldPublishers(self)
        self._overflows = 0
        #: Called when paged-out messages came back into memory (the owner may send them).
        self._on_refill: Callable[[], None] | None = None
        #: Tells a QoS 0 entry by its meta int (MQTT), for drop_oldest's preference.
        self._qos0 = qos0_meta

    def __len__(self) -> int:
        return len(self.entries) + self.paged

    def __bool__(self) -> bool:
        return bool(self.entries) or self.paged > 0

    def __repr__(self) -> str:
        return f"MessageQueue({self.name!r}, {len(self)} waiting, {self.paged} paged)"

    def on_refill(self, callback: Callable[[], None]) -> None:
        self._on_refill = callback

    # -- messages in ------------------------------------------------------------------------------

    def _seq(self) -> int:
        """The next sequence number; numbering starts again once the queue holds no row at all."""
        store = self._store
        assert store is not None
        if not self._rows and self._next_seq > store.max_seq // 2:
            store.renumber(self.key)
            self._next_seq = 0
            self._reading = False
            self._read_epoch += 1
        if self._next_seq >= store.max_seq:
            return 0
        self._next_seq += 1
        self._rows += 1
        return self._next_seq

    def persist(self, message: Message, meta: int) -> int:
        """Write a message that goes out at once (it is in flight) to the store; its sequence number.

        Only for durable queues; remove it with `settle` when acknowledged. 0 (not written) only
        when the queue used up its numbers without ever emptying.
        """
        seq = self._seq()
        if seq:
            self._store.add_message(self.key, seq, message, meta)  # type: ignore[union-attr]
        else:
            self._numbers_exhausted()
        return seq

    def put(self, message: Message, meta: int, publisher: Publisher = NO_PUBLISHER, *, persistent: bool = False,
            own: bool = False) -> int:
        """Queue a message; the status bits (STORED, REFUSED) for the router. 0 also when dropped.

        `own`: the publisher is this queue's own consumer (an MQTT session's connection, an AMQP
        connection consuming from the queue). It is never held back (its acknowledgements are what
        drains the queue), but it is still refused where it can be told.
        """
        size = len(message.payload)
        limits = self.limits
        if (len(self.entries) + self.paged >= limits.max_messages or self.bytes + size > limits.max_bytes) and self:
            # (A lone message larger than max_queued_bytes is taken rather than lost.)
            if not self._overflow(message, publisher, own):
                return REFUSED if publisher is not NO_PUBLISHER else 0
        status = 0
        seq = 0
        if self.durable:
            paging = self.paged or len(self.entries) >= self._window
            if persistent or paging:
                seq = self._seq()
                if not seq:
                    self._numbers_exhausted()
                    return REFUSED if publisher.refusable and publisher is not NO_PUBLISHER else 0
                self._store.add_message(self.key, seq, message, meta)  # type: ignore[union-attr]
                if persistent:
                    status = STORED
            if paging:
                # Beyond the window: only in the store, read back in order as the queue drains.
                if not self.paged:
                    self._page_from = seq - 1
                self.paged += 1
                self._paged_bytes += size
                self.bytes += size
                self._budget.paged += 1
                return status
        self.bytes += size
        self.entries.append((message, meta, seq))
        budget = self._budget
        budget.messages += 1
        if not seq:
            budget.transient += 1
        budget.add(size + len(message.topic) + MESSAGE_OVERHEAD)
        return status

    def _numbers_exhausted(self) -> None:
        self._metrics.dropped(self.protocol, "queue_numbers_exhausted")
        log.error("durable queue %r used up its sequence numbers without ever being empty; new messages are "
                  "refused until it is", self.name, extra={"event": "queue_numbers_exhausted", "queue": self.name})

    def _overflow(self, message: Message, publisher: Publisher, own: bool) -> bool:
        """The queue is full: apply the policy. True when the new message is to be taken."""
        policy = self.limits.overflow
        if policy == DROP_OLDEST:
            self._count_overflow(policy, "the oldest message was dropped")
            size = len(message.payload)
            limits = self.limits
            while self and (len(self) >= limits.max_messages or self.bytes + size > limits.max_bytes):
                self._drop_oldest()
            return True
        if policy == REJECT_NEW and publisher.refusable:
            self._count_overflow(policy, "the new message was refused")
            self._metrics.dropped(self.protocol, "queue_full")
            return False
        # block, or reject_new for a publisher that cannot be told: take it and hold the publisher,
        # unless it is this queue's own consumer, which must keep running to drain it.
        if own or publisher is NO_PUBLISHER:
            self._count_overflow(policy, "the message was taken over the bound (its publisher cannot wait)")
        else:
            self._count_overflow(policy, "the message was taken and its publisher is held")
            self._held.hold(publisher)
        return True

    def _drop_oldest(self) -> None:
        entries = self.entries
        if not entries:
            self._drop_paged()
            return
        index = 0
        qos0 = self._qos0
        if qos0 is not None:
            for position in range(min(QOS0_SCAN, len(entries))):
                if qos0(entries[position][1]):
                    index = position
                    break
        if index:
            entry = entries[index]
            del entries[index]
        else:
            entry = entries.popleft()
        self._forget(entry)
        self.settle(entry[2])
        self._metrics.dropped(self.protocol, "queue_full")
        self._after_removal()

    def _drop_paged(self) -> None:
        """The oldest message waiting in the store goes (memory is empty): the next read removes it."""
        if not self.paged:
            return
        share = self._paged_bytes // self.paged
        self._paged_bytes -= share
        self.bytes -= share
        self.paged -= 1
        self._skip += 1
        self._budget.paged -= 1
        self._metrics.dropped(self.protocol, "queue_full")
        self._read_more()

    def _count_overflow(self, policy: str, what: str) -> None:
        self._metrics.overflows[(self.protocol, policy)] += 1
        self._overflows += 1
        count = self._overflows
        if count == 1 or count % LOG_EVERY == 0:
            log.warning(
                "%s queue %r is full (%d messages, %d bytes; limits %d / %d): %s (%d overflow(s) so far)",
                self.protocol.value, self.name, len(self), self.bytes, self.limits.max_messages,
                self.limits.max_bytes, what, count,
                extra={"event": "queue_overflow", "queue": self.name, "policy": policy},
            )

    # -- messages out -----------------------------------------------------------------------------

    def popleft(self) -> Entry:
        """The oldest waiting message; its store row stays until `settle(seq)`."""
        entry = self.entries.popleft()
        self._forget(entry)
        self._after_removal()
        return entry

    def _after_removal(self) -> None:
        if self.paged and len(self.entries) <= self._window // 2:
            self._read_more()
        if self._held and len(self) <= self.limits.max_messages // 2 and self.bytes <= self.limits.max_bytes // 2:
            self._held.release_all()

    def appendleft(self, entry: Entry) -> None:
        """Put a message back at the front (not acknowledged; sent again later). Never refused."""
        self.entries.appendleft(entry)
        message = entry[0]
        self.bytes += len(message.payload)
        budget = self._budget
        budget.messages += 1
        if not entry[2]:
            budget.transient += 1
        budget.add(_size(message))

    def settle(self, seq: int) -> None:
        """A message taken with `popleft` (or `persist`) was acknowledged: forget its store row."""
        if seq and self.durable:
            self._rows -= 1
            self._store.remove_message(self.key, seq)  # type: ignore[union-attr]

    def _forget(self, entry: Entry) -> None:
        message = entry[0]
        self.bytes -= len(message.payload)
        budget = self._budget
        budget.messages -= 1
        if not entry[2]:
            budget.transient -= 1
        budget.sub(_size(message))

    def _read_more(self) -> None:
        if self._reading or not (self.paged or self._skip):
            return
        self._reading = True
        epoch = self._read_epoch
        self._store.read_messages(  # type: ignore[union-attr]
            self.key, self._page_from, self._window // 2 + self._skip, lambda stored: self._refilled(stored, epoch))

    def _refilled(self, stored: list[StoredEntry], epoch: int) -> None:
        if epoch != self._read_epoch:
            return  # asked for before the paged part was purged or the queue ended
        self._reading = False
        entries = self.entries
        budget = self._budget
        got = 0
        for seq, message, meta in stored:
            if seq <= self._page_from:
                continue
            if self._skip:
                # Dropped while it waited in the store: its row goes now.
                self._skip -= 1
                self._page_from = seq
                self.settle(seq)
                continue
            if got == self.paged:
                break
            self._page_from = seq
            entries.append((message, meta, seq))
            size = len(message.payload)
            self._paged_bytes -= size
            budget.messages += 1
            budget.add(_size(message))
            got += 1
        self.paged -= got
        budget.paged -= got
        if not stored:
            self._skip = 0
        if self.paged and not stored:
            log.error("queue %r: %d message(s) paged out to the store cannot be read back; they are lost",
                      self.name, self.paged)
            self._metrics.dropped(self.protocol, "store_lost", self.paged)
            budget.paged -= self.paged
            self.bytes -= self._paged_bytes
            self.paged = self._paged_bytes = 0
        if not self.paged:
            self.bytes -= self._paged_bytes
            self._paged_bytes = 0
        if (self.paged or self._skip) and len(entries) <= self._window // 2:
            # Everything the read returned had been dropped meanwhile, or rows wait to be removed: read on.
            self._read_more()
        if got and self._on_refill is not None:
            self._on_refill()

    # -- the whole queue --------------------------------------------------------------------------

    def clear(self) -> int:
        """The queue ends: forget every waiting message; how many there were.

        Its store rows are the owner's to delete (`Store.delete_queue`). From now on
        `settle` is a no-op, so a late acknowledgement of a message it delivered cannot
        touch a new queue of the same name.
        """
        lost = self._clear()
        self.durable = False
        return lost

    def _clear(self) -> int:
        lost = len(self)
        for entry in self.entries:
            self._forget(entry)
        self.entries.clear()
        self._budget.paged -= self.paged
        self.paged = 0
        self.bytes = 0
        self._paged_bytes = 0
        self._reading = False
        self._read_epoch += 1
        self._skip = 0
        self._held.release_all()
        return lost

    def purge(self) -> int:
        """Empty a queue that lives on: its stored rows go too (not those of delivered messages)."""
        if self.durable:
            for entry in self.entries:
                self.settle(entry[2])
            if self.paged or self._skip:
                # Every row numbered after page_from waits in the store (gaps or not).
                self._rows -= self.paged + self._skip
                self._store.remove_messages_after(self.key, self._page_from)  # type: ignore[union-attr]
        return self._clear()

    def release_publishers(self) -> None:
        self._held.release_all()

    def forget_publisher(self, publisher: Publisher) -> None:
        self._held.forget(publisher)

    def restore(self, stored: StoredQueue) -> None:
        """Load what the store kept for this queue at start (its head; the rest stays paged out)."""
        budget = self._budget
        for seq, message, meta in stored.head:
            self.entries.append((message, meta, seq))
            self.bytes += len(message.payload)
            budget.messages += 1
            budget.add(_size(message))
        self._next_seq = max(self._next_seq, stored.last_seq)
        self._rows += stored.count
        self.paged = stored.count - len(stored.head)
        if self.paged:
            self._page_from = stored.head[-1][0] if stored.head else 0
            average = (self.bytes // len(stored.head)) if stored.head else 0
            self._paged_bytes = average * self.paged
            self.bytes += self._paged_bytes
            budget.paged += self.paged
