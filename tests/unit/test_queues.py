"""Subscriber queues on plain values: bounds, overflow policies, the memory budget, durability and paging."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from gateway import queues as queues_module
from gateway.backpressure import NO_PUBLISHER, Blocker, Publisher
from gateway.config_types import LimitsConfig
from gateway.events import Protocol
from gateway.message import Message
from gateway.metrics import Metrics
from gateway.queues import (
    BLOCK,
    DROP_OLDEST,
    MESSAGE_OVERHEAD,
    REFUSED,
    REJECT_NEW,
    STORED,
    MemoryBudget,
    MessageQueue,
    QueueLimits,
    limits_for,
)
from gateway.store.base import StoredQueue
from gateway.store.memory import MemoryStore
from tests.unit.store_doubles import RecordingStore

KEY = "mqtt:c1"


class Pub:
    """A publisher that records who holds it (no event loop needed)."""

    def __init__(self, refusable: bool = True, name: str = "p") -> None:
        self.refusable = refusable
        self.name = name
        self.holders: list[Blocker] = []

    def hold(self, blocker: Blocker) -> None:
        assert blocker not in self.holders, "held twice by one holder"
        self.holders.append(blocker)

    def release(self, blocker: Blocker) -> None:
        self.holders.remove(blocker)

    def __repr__(self) -> str:
        return f"Pub({self.name})"


def make_queue(
    max_messages: int = 3,
    max_bytes: int = 10**6,
    overflow: str = DROP_OLDEST,
    *,
    budget: MemoryBudget | None = None,
    metrics: Metrics | None = None,
    store: Any = None,
    key: str = "",
    window: int = 10_000,
    qos0: bool = False,
    protocol: Protocol = Protocol.MQTT,
) -> MessageQueue:
    return MessageQueue(
        name="q", protocol=protocol, limits=QueueLimits(max_messages, max_bytes, overflow),
        budget=budget if budget is not None else MemoryBudget(0), metrics=metrics if metrics is not None else Metrics(),
        store=store, key=key, window=window, qos0_meta=(lambda meta: meta == 0) if qos0 else None,
    )


def msg(payload: bytes | str, qos: int = 1, topic: str = "t") -> Message:
    return Message(topic, payload.encode() if isinstance(payload, str) else payload, qos)


def payloads(queue: MessageQueue) -> list[bytes]:
    return [entry[0].payload for entry in queue.entries]


def cost(message: Message) -> int:
    return len(message.payload) + len(message.topic) + MESSAGE_OVERHEAD


# -- limits ---------------------------------------------------------------------------------------------


def test_limits_are_validated_and_come_from_the_config() -> None:
    with pytest.raises(ValueError, match="unknown overflow policy"):
        QueueLimits(1, 1, "drop_newest")
    with pytest.raises(ValueError, match="at least 1"):
        QueueLimits(0, 1, BLOCK)
    with pytest.raises(ValueError, match="at least 1"):
        QueueLimits(1, 0, BLOCK)
    config = LimitsConfig(max_queued_messages=7, max_queued_bytes=99)
    assert limits_for(config, Protocol.MQTT) == QueueLimits(7, 99, config.queue_overflow[Protocol.MQTT])
    assert limits_for(config, Protocol.AMQP091).overflow == config.queue_overflow[Protocol.AMQP091]


# -- drop_oldest ------------------------------------------------------------------------------------------


def test_drop_oldest_at_the_message_bound() -> None:
    metrics = Metrics()
    queue = make_queue(3, metrics=metrics)
    publisher = Pub()
    for n in range(5):
        assert queue.put(msg(str(n)), 1, publisher) == 0
    assert payloads(queue) == [b"2", b"3", b"4"]
    assert len(queue) == 3 and queue.bytes == 3
    assert metrics.overflows[(Protocol.MQTT, DROP_OLDEST)] == 2
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 2
    assert publisher.holders == []  # drop_oldest never holds


def test_drop_oldest_at_the_byte_bound_drops_as_many_as_needed() -> None:
    metrics = Metrics()
    queue = make_queue(100, 10, metrics=metrics)
    for payload in ("aaa", "bbb", "ccc"):
        queue.put(msg(payload), 1)
    assert queue.bytes == 9
    queue.put(msg("dd"), 1)  # 11 > 10: the oldest goes
    assert payloads(queue) == [b"bbb", b"ccc", b"dd"] and queue.bytes == 8
    queue.put(msg("eeeeeeee"), 1)  # 8 more: two must go
    assert payloads(queue) == [b"dd", b"eeeeeeee"] and queue.bytes == 10
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 3
    assert metrics.overflows[(Protocol.MQTT, DROP_OLDEST)] == 2  # one overflow per refused fit, not per drop


@pytest.mark.parametrize("overflow", [DROP_OLDEST, REJECT_NEW, BLOCK])
def test_one_message_larger_than_the_byte_bound_is_taken_by_an_empty_queue(overflow: str) -> None:
    metrics = Metrics()
    queue = make_queue(5, 4, overflow, metrics=metrics)
    publisher = Pub()
    assert queue.put(msg("too big"), 1, publisher) == 0
    assert payloads(queue) == [b"too big"] and queue.bytes == 7
    assert metrics.overflows == {} and publisher.holders == []


def test_drop_oldest_prefers_a_qos0_entry_near_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queues_module, "QOS0_SCAN", 3)
    queue = make_queue(4, qos0=True)
    for payload, meta in (("q1", 1), ("q2", 2), ("z0", 0), ("q3", 1)):
        queue.put(msg(payload), meta)
    queue.put(msg("new"), 1)
    assert payloads(queue) == [b"q1", b"q2", b"q3", b"new"]  # the QoS 0 one went, not the head
    queue.put(msg("z1"), 0)
    queue.put(msg("newer"), 1)
    # No QoS 0 entry among the first QOS0_SCAN: the head goes (`z1` is fourth).
    assert payloads(queue) == [b"q3", b"new", b"z1", b"newer"]


def test_drop_oldest_drops_the_head_without_qos0_meta() -> None:
    queue = make_queue(2)
    queue.put(msg("a"), 1)
    queue.put(msg("b"), 0)
    queue.put(msg("c"), 1)
    assert payloads(queue) == [b"b", b"c"]


# -- reject_new -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["messages", "bytes"])
def test_reject_new_refuses_a_refusable_publisher(bound: str) -> None:
    metrics = Metrics()
    queue = make_queue(2, 100, REJECT_NEW, metrics=metrics) if bound == "messages" else make_queue(100, 4, REJECT_NEW, metrics=metrics)
    publisher = Pub(refusable=True)
    assert queue.put(msg("aa"), 1, publisher) == 0
    assert queue.put(msg("bb"), 1, publisher) == 0
    assert queue.put(msg("c"), 1, publisher) == REFUSED
    assert payloads(queue) == [b"aa", b"bb"]
    assert publisher.holders == []
    assert metrics.overflows[(Protocol.MQTT, REJECT_NEW)] == 1
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1
    # Nobody to tell (NO_PUBLISHER): the refusal is a drop without a status.
    assert queue.put(msg("d"), 1, NO_PUBLISHER) == 0
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 2


@pytest.mark.parametrize("bound", ["messages", "bytes"])
def test_reject_new_holds_a_publisher_that_cannot_be_told_and_takes_its_message(bound: str) -> None:
    metrics = Metrics()
    queue = make_queue(2, 100, REJECT_NEW, metrics=metrics) if bound == "messages" else make_queue(100, 4, REJECT_NEW, metrics=metrics)
    mqtt311 = Pub(refusable=False)
    queue.put(msg("aa"), 1, mqtt311)
    queue.put(msg("bb"), 1, mqtt311)
    assert queue.put(msg("c"), 1, mqtt311) == 0
    assert payloads(queue) == [b"aa", b"bb", b"c"]  # nothing it was acknowledged for is lost
    assert mqtt311.holders == [queue]
    assert queue.put(msg("d"), 1, mqtt311) == 0  # held once
    assert mqtt311.holders == [queue]
    assert metrics.messages_dropped == {}
    assert metrics.overflows[(Protocol.MQTT, REJECT_NEW)] == 2
    while len(queue) > 1:
        queue.popleft()
    assert mqtt311.holders == []


# -- block ------------------------------------------------------------------------------------------------


def test_block_takes_the_message_and_holds_until_half_the_message_bound() -> None:
    metrics = Metrics()
    queue = make_queue(4, 10**6, BLOCK, metrics=metrics)
    first, second = Pub(name="first"), Pub(name="second")
    for n in range(4):
        assert queue.put(msg(str(n)), 1, first) == 0
    assert first.holders == []
    assert queue.put(msg("4"), 1, first) == 0
    assert queue.put(msg("5"), 1, second) == 0
    assert queue.put(msg("6"), 1, NO_PUBLISHER) == 0  # nobody to hold: taken anyway
    assert payloads(queue) == [str(n).encode() for n in range(7)]
    assert first.holders == [queue] and second.holders == [queue]
    assert metrics.overflows[(Protocol.MQTT, BLOCK)] == 3 and metrics.messages_dropped == {}
    for left in (6, 5, 4, 3):
        queue.popleft()
        assert len(queue) == left and first.holders == [queue]
    queue.popleft()  # 2 = half of 4
    assert first.holders == [] and second.holders == []


def test_block_releases_only_when_bytes_are_down_to_half_too() -> None:
    queue = make_queue(4, 10, BLOCK)
    publisher = Pub()
    queue.put(msg("xxxxxxxx"), 1)
    queue.put(msg("a"), 1)
    queue.put(msg("bbb"), 1, publisher)  # 12 > 10: held
    assert publisher.holders == [queue]
    queue.popleft()  # 2 messages (<= 2), 4 bytes (<= 5)
    assert publisher.holders == []
    queue.put(msg("cccccc"), 1, publisher)  # 10 bytes: fits
    queue.put(msg("d"), 1, publisher)  # 11: held
    assert publisher.holders == [queue]
    queue.popleft()  # 3 messages (> 2)
    assert publisher.holders == [queue]
    queue.popleft()  # 2 messages, 7 bytes (> 5)
    assert len(queue) == 2 and queue.bytes == 7 and publisher.holders == [queue]
    queue.popleft()
    assert publisher.holders == []


def test_clear_detach_and_forget_release_held_publishers() -> None:
    queue = make_queue(1, overflow=BLOCK)
    kept, gone = Pub(name="kept"), Pub(name="gone")
    queue.put(msg("a"), 1)
    queue.put(msg("b"), 1, kept)
    queue.put(msg("c"), 1, gone)
    queue.forget_publisher(gone)  # its connection closed
    queue.release_publishers()  # e.g. the session's connection detached
    assert kept.holders == [] and gone.holders == [queue]
    queue.put(msg("d"), 1, kept)
    assert kept.holders == [queue]
    assert queue.clear() == 4
    assert kept.holders == [] and len(queue) == 0 and queue.bytes == 0


def test_overflows_are_logged_first_and_every_thousandth(caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queues_module, "LOG_EVERY", 3)
    queue = make_queue(1)
    with caplog.at_level(logging.WARNING, logger="polygate.queues"):
        for n in range(8):
            queue.put(msg(str(n)), 1)
    logged = [r for r in caplog.records if getattr(r, "event", None) == "queue_overflow"]
    assert len(logged) == 3  # overflows 1, 3 and 6
    assert "the oldest message was dropped" in logged[0].getMessage()


# -- the memory budget ------------------------------------------------------------------------------------


def test_budget_alarm_on_above_high_off_below_ninety_percent() -> None:
    budget = MemoryBudget(1000)
    heard: list[bool] = []
    budget.listeners.append(heard.append)
    budget.add(1000)
    assert not budget.alarm  # not above
    budget.add(1)
    assert budget.alarm and heard == [True]
    budget.add(500)
    assert heard == [True]  # told once
    budget.sub(601)  # 900: 90% exactly
    assert budget.alarm
    budget.sub(1)
    assert not budget.alarm and heard == [True, False] and budget.used == 899
    budget.add(101)
    assert not budget.alarm  # 1000 is not above


def test_budget_alarm_releases_held_publishers_and_survives_a_failing_listener(caplog: pytest.LogCaptureFixture) -> None:
    budget = MemoryBudget(100)
    heard: list[bool] = []

    def broken(alarm: bool) -> None:
        raise RuntimeError("listener")

    budget.listeners.extend([broken, heard.append])
    with caplog.at_level(logging.ERROR, logger="polygate.queues"):
        budget.add(101)
    assert heard == [True]
    assert any("listener failed" in r.getMessage() for r in caplog.records)
    publishers = [Pub(name="a"), Pub(name="b")]
    for publisher in publishers:
        budget.held.hold(publisher)
    budget.forget_publisher(publishers[1])
    assert publishers[0].holders == [budget]
    budget.sub(50)
    assert heard == [True, False]
    assert publishers[0].holders == [] and publishers[1].holders == [budget]  # the forgotten one is not told


def test_a_budget_without_a_watermark_never_alarms() -> None:
    budget = MemoryBudget(0)
    budget.add(10**15)
    assert not budget.alarm


def test_queued_messages_count_against_the_budget() -> None:
    budget = MemoryBudget(0)
    first, second = make_queue(10, budget=budget), make_queue(10, budget=budget)
    a, b, c = msg("aaa", topic="x/y"), msg("bb"), msg("")
    first.put(a, 1)
    first.put(b, 1)
    second.put(c, 0)
    assert budget.used == cost(a) + cost(b) + cost(c) and budget.messages == 3
    entry = first.popleft()
    assert entry == (a, 1, 0)
    assert budget.used == cost(b) + cost(c) and budget.messages == 2
    first.appendleft(entry)
    assert budget.used == cost(a) + cost(b) + cost(c) and payloads(first) == [b"aaa", b"bb"]
    second.clear()
    first.clear()
    assert budget.used == 0 and budget.messages == 0


def test_a_full_budget_alarms_through_the_queues_and_clears_as_they_drain() -> None:
    budget = MemoryBudget(3 * (1 + 1 + MESSAGE_OVERHEAD))
    queue = make_queue(10, budget=budget)
    held = Pub()
    for n in range(4):
        queue.put(msg(str(n)), 1)
    assert budget.alarm
    budget.held.hold(held)  # what the router does while the alarm is on
    queue.popleft()
    assert budget.alarm  # 3 left: not below 90% of 3
    queue.popleft()
    assert not budget.alarm and held.holders == []


# -- durability -------------------------------------------------------------------------------------------


def test_a_queue_is_durable_only_with_a_durable_store_and_a_key() -> None:
    assert make_queue(store=RecordingStore(), key=KEY).durable
    assert not make_queue(store=RecordingStore()).durable
    assert not make_queue(store=MemoryStore(), key=KEY).durable
    assert not make_queue(key=KEY).durable


def test_persistent_puts_are_written_and_settle_removes_them() -> None:
    store = RecordingStore()
    budget = MemoryBudget(0)
    queue = make_queue(10, store=store, key=KEY, budget=budget)
    assert queue.put(msg("p1"), 1, persistent=True) == STORED
    assert queue.put(msg("t", qos=0), 0) == 0  # not persistent: memory only
    assert queue.put(msg("p2"), 2, persistent=True) == STORED
    # Only written messages take a sequence number: the rows have no gaps.
    assert store.calls == [("add", KEY, 1, b"p1", 1), ("add", KEY, 2, b"p2", 2)]
    assert budget.messages == 3 and budget.transient == 1  # what a stop would lose
    first = queue.popleft()
    assert first[2] == 1 and store.payloads(KEY) == [b"p1", b"p2"]  # the row stays until settled
    queue.settle(first[2])
    assert store.payloads(KEY) == [b"p2"]
    transient = queue.popleft()
    assert transient[2] == 0 and budget.transient == 0
    queue.settle(transient[2])  # seq 0: nothing to remove
    assert store.ops("remove") == [("remove", KEY, 1)]


def test_persist_writes_a_message_that_goes_out_at_once() -> None:
    store = RecordingStore()
    queue = make_queue(10, store=store, key=KEY)
    seq = queue.persist(msg("inflight"), 1)
    assert seq == 1 and store.payloads(KEY) == [b"inflight"] and len(queue) == 0
    assert queue.put(msg("queued"), 1, persistent=True) == STORED
    assert queue.entries[0][2] == 2
    queue.settle(seq)
    assert store.payloads(KEY) == [b"queued"]


def test_drop_oldest_removes_the_dropped_row() -> None:
    store = RecordingStore()
    metrics = Metrics()
    queue = make_queue(2, store=store, key=KEY, metrics=metrics)
    for n in range(3):
        queue.put(msg(str(n)), 1, persistent=True)
    assert store.payloads(KEY) == [b"1", b"2"]
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1


def test_paging_beyond_the_window_writes_rows_and_reads_back_in_order() -> None:
    store = RecordingStore(auto_read=False)
    budget = MemoryBudget(0)
    queue = make_queue(100, store=store, key=KEY, window=4, budget=budget)
    refills: list[int] = []
    queue.on_refill(lambda: refills.append(len(queue.entries)))
    kinds = [True, False, True, True, False, True, False, True]  # persistent?
    statuses = [queue.put(msg(str(n), qos=1 if p else 0), 1 if p else 0, persistent=p) for n, p in enumerate(kinds)]
    assert statuses == [STORED, 0, STORED, STORED, 0, STORED, 0, STORED]
    assert payloads(queue) == [b"0", b"1", b"2", b"3"] and queue.paged == 4 and len(queue) == 8
    assert queue.bytes == 8 and budget.paged == 4 and budget.messages == 4
    # Beyond the window every message is written, the non-persistent ones too, as ordinary rows
    # (a restart finds them); within the window only the persistent ones.
    assert [(c[2], c[3], c[4]) for c in store.ops("add")] == [
        (1, b"0", 1), (2, b"2", 1), (3, b"3", 1),
        (4, b"4", 0), (5, b"5", 1), (6, b"6", 0), (7, b"7", 1),
    ]
    assert store.payloads(KEY) == [b"0", b"2", b"3", b"4", b"5", b"6", b"7"]
    queue.popleft()
    assert store.ops("read") == []  # 3 left in memory: more than half the window
    queue.popleft()
    assert store.ops("read") == [("read", KEY, 3, 2)]  # after the last seq in memory, half a window
    queue.popleft()
    assert len(store.ops("read")) == 1  # one read at a time
    assert store.answer_reads() == 1
    assert refills == [3]
    assert payloads(queue) == [b"3", b"4", b"5"] and queue.paged == 2 and budget.paged == 2
    assert [seq for _, _, seq in queue.entries] == [3, 4, 5]
    assert len(queue) == 5 and queue.bytes == 5
    # Draining on reads the rest, in order; a paged non-persistent message's row is settled like any other.
    out = []
    while queue:
        while queue.entries:
            message, meta, seq = queue.popleft()
            out.append(message.payload)
            queue.settle(seq)
        store.answer_reads()
    assert out == [b"3", b"4", b"5", b"6", b"7"]
    assert queue.paged == 0 and queue.bytes == 0 and budget.paged == 0 and budget.messages == 0 and budget.used == 0
    assert store.payloads(KEY) == [b"0", b"2"]  # popped earlier and never settled by this test


def test_a_put_while_paged_goes_behind_the_paged_messages() -> None:
    store = RecordingStore()  # reads answered at once
    queue = make_queue(100, store=store, key=KEY, window=2)
    for n in range(5):
        queue.put(msg(str(n)), 1, persistent=True)
    out = []
    for n in range(5, 8):
        out.append(queue.popleft()[0].payload)
        queue.put(msg(str(n)), 1, persistent=True)
    while queue.entries:
        out.append(queue.popleft()[0].payload)
    assert out == [str(n).encode() for n in range(8)]
    assert not queue


def test_a_store_that_cannot_read_back_loses_the_paged_messages_counted(caplog: pytest.LogCaptureFixture) -> None:
    store = RecordingStore(auto_read=False)
    metrics = Metrics()
    budget = MemoryBudget(0)
    queue = make_queue(100, store=store, key=KEY, window=2, metrics=metrics, budget=budget)
    for n in range(5):
        queue.put(msg(str(n) * 2), 1, persistent=True)
    assert queue.paged == 3 and queue.bytes == 10
    store.rows[KEY].clear()  # the rows are gone
    queue.popleft()
    with caplog.at_level(logging.ERROR, logger="polygate.queues"):
        store.answer_reads()
    assert queue.paged == 0 and len(queue) == 1 and queue.bytes == 2 and budget.paged == 0
    assert metrics.messages_dropped[(Protocol.MQTT, "store_lost")] == 3
    assert any("cannot be read back" in r.getMessage() for r in caplog.records)


def _memory_emptied_with_a_read_on_its_way(store: RecordingStore, metrics: Metrics) -> MessageQueue:
    queue = make_queue(6, store=store, key=KEY, window=4, metrics=metrics)
    for n in range(6):
        queue.put(msg(str(n)), 1, persistent=True)  # 0-3 in memory, 4 5 paged
    for _ in range(4):
        queue.popleft()  # the second popleft asked for 4 and 5
    assert store.ops("read") == [("read", KEY, 4, 2)] and not queue.entries  # message n has seq n + 1
    for n in range(6, 10):
        queue.put(msg(str(n)), 1, persistent=True)  # full again, all paged
    assert len(queue) == 6 == queue.paged
    return queue


def test_drop_oldest_while_memory_waits_for_a_read_drops_the_oldest_paged_message() -> None:
    store = RecordingStore(auto_read=False)
    metrics = Metrics()
    queue = _memory_emptied_with_a_read_on_its_way(store, metrics)
    queue.put(msg("10"), 1, persistent=True)  # full: the oldest (paged `4`) goes
    assert len(queue) == 6 and queue.paged == 6
    store.answer_reads()  # the answer starts with `4`: its row is removed, not queued
    assert store.payloads(KEY) == [str(n).encode() for n in (0, 1, 2, 3, 5, 6, 7, 8, 9, 10)]
    assert payloads(queue) == [b"5"]
    out = []
    while queue:
        while queue.entries:
            out.append(queue.popleft()[0].payload)
        store.answer_reads()
    assert out == [str(n).encode() for n in (5, 6, 7, 8, 9, 10)]
    assert queue.bytes == 0 and queue.paged == 0
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_full"): 1}


def test_drops_of_everything_a_pending_read_returns_lose_nothing_else() -> None:
    """The read's whole answer was dropped meanwhile: the queue reads on instead of declaring loss."""
    store = RecordingStore(auto_read=False)
    metrics = Metrics()
    queue = _memory_emptied_with_a_read_on_its_way(store, metrics)
    queue.put(msg("10"), 1, persistent=True)  # drops paged `4`
    queue.put(msg("11"), 1, persistent=True)  # drops paged `5`: all the read will return
    out = []
    while queue:
        while queue.entries:
            out.append(queue.popleft()[0].payload)
        if not store.answer_reads():
            break
    assert out == [str(n).encode() for n in range(6, 12)]
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_full"): 2}
    assert queue.bytes == 0 and queue.paged == 0
    # Rows left: the four delivered (never settled here) and the six just sent out.
    assert store.payloads(KEY) == [str(n).encode() for n in (0, 1, 2, 3, *range(6, 12))]


def test_clear_ends_the_queue_and_later_settles_touch_nothing() -> None:
    """A late ack of a message a deleted queue delivered must not remove a row of a new queue of that name."""
    store = RecordingStore()
    queue = make_queue(10, store=store, key=KEY)
    queue.put(msg("queued"), 1, persistent=True)
    old_seq = queue.popleft()[2]  # delivered, not yet acknowledged
    assert queue.clear() == 0
    assert not queue.durable
    store.delete_queue(KEY)  # the owner's part
    new = make_queue(10, store=store, key=KEY)
    assert new.put(msg("new"), 1, persistent=True) == STORED
    assert new.entries[0][2] == old_seq  # numbering starts again: the same seq as the old delivery
    queue.settle(old_seq)  # the late ack
    assert store.payloads(KEY) == [b"new"] and store.ops("remove") == []


def test_purge_removes_every_row_of_a_queue_that_lives_on() -> None:
    store = RecordingStore(auto_read=False)
    queue = make_queue(100, store=store, key=KEY, window=2)
    for n in range(5):
        queue.put(msg(str(n)), 1, persistent=n % 2 == 0)
    assert queue.purge() == 5
    assert store.payloads(KEY) == [] and not queue and queue.bytes == 0
    queue.put(msg("after"), 1, persistent=True)
    assert payloads(queue) == [b"after"]


def test_restore_loads_the_head_and_leaves_the_rest_paged() -> None:
    store = RecordingStore()
    for seq in range(3, 9):
        store.add_message(KEY, seq, msg(f"m{seq}"), seq % 3)
    store.calls.clear()
    budget = MemoryBudget(0)
    queue = make_queue(100, store=store, key=KEY, window=4, budget=budget)
    queue.restore(StoredQueue(key=KEY, meta={}, head=store.select(KEY, 0, 4), count=6, last_seq=9))
    assert [(e[0].payload, e[1], e[2]) for e in queue.entries] == [(b"m3", 0, 3), (b"m4", 1, 4), (b"m5", 2, 5), (b"m6", 0, 6)]
    assert len(queue) == 6 and queue.paged == 2 and queue.bytes == 12
    assert budget.messages == 4 and budget.paged == 2
    assert queue.put(msg("new"), 1, persistent=True) == STORED
    assert store.ops("add") == [("add", KEY, 10, b"new", 1)]  # numbering goes on after last_seq
    out = []
    while queue:
        while queue.entries:
            message, _, seq = queue.popleft()
            out.append(message.payload)
            queue.settle(seq)
    assert out == [b"m3", b"m4", b"m5", b"m6", b"m7", b"m8", b"new"]
    assert store.payloads(KEY) == [] and queue.bytes == 0 and budget.paged == 0 and budget.used == 0


@pytest.mark.parametrize("ask", ["popleft", "drop_oldest"])
def test_drop_oldest_that_empties_memory_still_reads_the_paged_messages_back(ask: str) -> None:
    """Owners only pump `entries`: once memory is empty the queue itself must ask for the paged messages."""
    store = RecordingStore()  # reads answered at once
    metrics = Metrics()
    queue = make_queue(10, store=store, key=KEY, window=4, metrics=metrics)
    for n in range(14):
        queue.put(msg(str(n)), 1, persistent=True)
    assert len(queue) == 10
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_full"): 4}
    # What Session.pump and the AMQP Queue.dispatch do: send while `entries` has something.
    out = []
    while queue.entries:
        message, _, seq = queue.popleft()
        out.append(message.payload)
        queue.settle(seq)
    assert out == [str(n).encode() for n in range(4, 14)]
    assert not queue and queue.bytes == 0 and store.payloads(KEY) == []
    assert (Protocol.MQTT, "store_lost") not in metrics.messages_dropped


def test_drop_oldest_of_the_last_message_in_memory_asks_for_the_paged_ones_once() -> None:
    store = RecordingStore(auto_read=False)
    queue = make_queue(5, store=store, key=KEY, window=2)
    for n in range(5):
        queue.put(msg(str(n)), 1, persistent=True)  # 0 1 in memory, 2 3 4 paged
    queue.popleft()  # 1 left in memory: a read for 2 is asked for
    assert store.ops("read") == [("read", KEY, 2, 1)]
    queue.put(msg("5"), 1, persistent=True)
    queue.put(msg("6"), 1, persistent=True)  # full: `1` (the last in memory) goes
    assert not queue.entries and len(store.ops("read")) == 1  # the read on its way is enough
    store.answer_reads()
    assert payloads(queue) == [b"2"]


@pytest.mark.parametrize("end", ["purge", "clear"])
def test_a_read_answered_after_purge_does_not_lose_messages_paged_since(end: str) -> None:
    store = RecordingStore(auto_read=False)
    metrics = Metrics()
    queue = make_queue(100, store=store, key=KEY, window=4, metrics=metrics, protocol=Protocol.AMQP091)
    for n in range(6):
        queue.put(msg(str(n)), 0, persistent=True)
    queue.popleft()
    queue.popleft()  # a read is asked for
    assert len(store.reads) == 1
    if end == "purge":
        assert queue.purge() == 4
        assert store.payloads(KEY) == [b"0", b"1"]  # only the two delivered and not yet settled
    else:
        assert queue.clear() == 4
        store.delete_queue(KEY)  # the owner's part
        queue = make_queue(100, store=store, key=KEY, window=4, metrics=metrics, protocol=Protocol.AMQP091)
    for n in range(6, 12):
        queue.put(msg(str(n)), 0, persistent=True)  # 4 in memory, 2 paged again
    store.answer_reads()  # the stale answer (rows 3..) is ignored
    assert payloads(queue) == [b"6", b"7", b"8", b"9"] and queue.paged == 2
    out = []
    while queue:
        while queue.entries:
            message, _, seq = queue.popleft()
            out.append(message.payload)
            queue.settle(seq)
        if not store.answer_reads():
            break
    assert out == [str(n).encode() for n in range(6, 12)]
    assert metrics.messages_dropped == {}
    assert store.payloads(KEY) == ([b"0", b"1"] if end == "purge" else [])


def test_purge_of_a_restored_paged_queue_removes_every_row() -> None:
    store = RecordingStore()
    for seq in range(1, 7):
        store.add_message(KEY, seq, msg(str(seq)), 0)
    queue = make_queue(100, store=store, key=KEY, window=2, protocol=Protocol.AMQP091)
    queue.restore(StoredQueue(key=KEY, meta={}, head=store.select(KEY, 0, 2), count=6, last_seq=6))
    assert len(queue) == 6 and queue.paged == 4
    store.calls.clear()
    assert queue.purge() == 6
    assert store.payloads(KEY) == [] and not queue and queue.bytes == 0
    # The two in memory one by one, the paged ones (whatever their numbers) as one range.
    assert sorted(call[2] for call in store.ops("remove")) == [1, 2]
    assert [call[2] for call in store.ops("remove_after")] == [2]
    # It lives on: no row left, so a long-used numbering may start again; new messages page as before.
    for n in range(4):
        queue.put(msg(f"new{n}"), 0, persistent=True)
    assert [call[2] for call in store.ops("add")] == [7, 8, 9, 10]
    assert payloads(queue) == [b"new0", b"new1"] and queue.paged == 2




def _restored_with_a_gap_past_the_head(store: RecordingStore, max_messages: int = 100,
                                       metrics: Metrics | None = None) -> MessageQueue:
    """Rows 1 2 3 5: message 4 of five delivered was acknowledged first; then a restart with window 2."""
    before = make_queue(100, store=store, key=KEY, window=2, protocol=Protocol.AMQP091)
    for n in range(1, 6):
        before.put(msg(str(n)), 0, persistent=True)
    delivered = []
    while before:
        while before.entries:
            delivered.append(before.popleft())
        store.answer_reads()
    before.settle(delivered[3][2])
    assert store.payloads(KEY) == [b"1", b"2", b"3", b"5"]
    queue = make_queue(max_messages, store=store, key=KEY, window=2, protocol=Protocol.AMQP091, metrics=metrics)
    queue.restore(StoredQueue(key=KEY, meta={}, head=store.select(KEY, 0, 2), count=4, last_seq=5))
    assert len(queue) == 4 and queue.paged == 2
    return queue


def test_purge_of_a_restored_queue_with_a_gap_in_its_paged_rows_removes_every_row() -> None:
    store = RecordingStore()
    queue = _restored_with_a_gap_past_the_head(store)
    assert queue.purge() == 4
    assert store.payloads(KEY) == []


def test_drop_oldest_of_a_restored_queue_with_a_gap_drops_the_oldest_and_keeps_the_newest() -> None:
    store = RecordingStore(auto_read=False)
    metrics = Metrics()
    queue = _restored_with_a_gap_past_the_head(store, max_messages=2, metrics=metrics)
    for _ in range(2):
        queue.settle(queue.popleft()[2])  # 1 and 2 delivered again and acknowledged; 3 and 5 paged
    queue.put(msg("6"), 0, persistent=True)  # full: paged `3` goes
    queue.put(msg("7"), 0, persistent=True)  # full: paged `5` goes
    out = []
    while queue:
        while queue.entries:
            message, _, seq = queue.popleft()
            out.append(message.payload)
            queue.settle(seq)
        if not store.answer_reads():
            break
    assert out == [b"6", b"7"]
    assert metrics.messages_dropped == {(Protocol.AMQP091, "queue_full"): 2}
    assert store.payloads(KEY) == []


# -- own publishers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", [REJECT_NEW, BLOCK])
def test_the_queues_own_consumer_is_never_held(overflow: str, caplog: pytest.LogCaptureFixture) -> None:
    """Its acknowledgements are what drain the queue: holding it would deadlock both."""
    metrics = Metrics()
    queue = make_queue(2, overflow=overflow, metrics=metrics)
    own = Pub(refusable=False, name="own")
    queue.put(msg("a"), 1, own, own=True)
    queue.put(msg("b"), 1, own, own=True)
    with caplog.at_level(logging.WARNING, logger="polygate.queues"):
        assert queue.put(msg("c"), 1, own, own=True) == 0  # taken over the bound: never lost
    assert payloads(queue) == [b"a", b"b", b"c"] and own.holders == []
    assert metrics.overflows[(Protocol.MQTT, overflow)] == 1 and metrics.messages_dropped == {}
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "queue_overflow"]
    assert "taken over the bound" in record.getMessage()
    # Another publisher into the same full queue is held as before.
    other = Pub(refusable=False, name="other")
    assert queue.put(msg("d"), 1, other) == 0
    assert other.holders == [queue] and own.holders == []


def test_the_queues_own_consumer_is_still_refused_where_it_can_be_told() -> None:
    metrics = Metrics()
    queue = make_queue(2, overflow=REJECT_NEW, metrics=metrics)
    own = Pub(refusable=True, name="own")
    queue.put(msg("a"), 1, own, own=True)
    queue.put(msg("b"), 1, own, own=True)
    assert queue.put(msg("c"), 1, own, own=True) == REFUSED
    assert payloads(queue) == [b"a", b"b"] and own.holders == []
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1


@pytest.mark.parametrize("overflow, refusable", [(BLOCK, True), (BLOCK, False), (REJECT_NEW, False)])
def test_a_held_publisher_is_logged_as_held(overflow: str, refusable: bool, caplog: pytest.LogCaptureFixture) -> None:
    queue = make_queue(1, overflow=overflow)
    publisher = Pub(refusable=refusable)
    queue.put(msg("a"), 1, publisher)
    with caplog.at_level(logging.WARNING, logger="polygate.queues"):
        assert queue.put(msg("b"), 1, publisher) == 0
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "queue_overflow"]
    assert "the message was taken and its publisher is held" in record.getMessage()
    assert publisher.holders == [queue]


def test_a_refused_message_is_logged_as_refused(caplog: pytest.LogCaptureFixture) -> None:
    queue = make_queue(1, overflow=REJECT_NEW)
    queue.put(msg("a"), 1)
    with caplog.at_level(logging.WARNING, logger="polygate.queues"):
        assert queue.put(msg("b"), 1, Pub()) == REFUSED
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "queue_overflow"]
    assert "the new message was refused" in record.getMessage()


# -- sequence numbers: renumbering and running out ---------------------------------------------------------


def test_an_empty_queue_past_half_its_numbers_starts_again_at_one() -> None:
    store = RecordingStore(max_seq=10)
    queue = make_queue(100, store=store, key=KEY)
    for n in range(5):
        assert queue.put(msg(str(n)), 1, persistent=True) == STORED
    while queue:  # drained and settled: 5 used, not more than half of 10
        queue.settle(queue.popleft()[2])
    assert queue.put(msg("5"), 1, persistent=True) == STORED
    assert store.ops("renumber") == [] and queue.entries[0][2] == 6
    queue.settle(queue.popleft()[2])  # 6 used and no row left: the next one renumbers
    assert queue.put(msg("6"), 1, persistent=True) == STORED
    assert store.ops("renumber", "add")[-2:] == [("renumber", KEY), ("add", KEY, 1, b"6", 1)]
    assert queue.entries[0][2] == 1 and store.payloads(KEY) == [b"6"]


def test_a_queue_with_a_row_in_flight_does_not_renumber() -> None:
    store = RecordingStore(max_seq=10)
    queue = make_queue(100, store=store, key=KEY)
    for n in range(6):
        queue.put(msg(str(n)), 1, persistent=True)
    entries = [queue.popleft() for _ in range(6)]
    for entry in entries[1:]:
        queue.settle(entry[2])
    assert not queue  # empty, but seq 1 is delivered and not yet acknowledged: its row stays
    assert queue.put(msg("6"), 1, persistent=True) == STORED
    assert store.ops("renumber") == [] and queue.entries[0][2] == 7
    queue.settle(entries[0][2])
    assert store.payloads(KEY) == [b"6"]
    # `persist` (a message straight out, in flight) takes a number the same way.
    assert queue.persist(msg("inflight"), 1) == 8
    assert store.ops("renumber") == []


def test_a_queue_that_never_empties_refuses_at_max_seq_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    store = RecordingStore(max_seq=4)
    metrics = Metrics()
    budget = MemoryBudget(0)
    queue = make_queue(100, store=store, key=KEY, metrics=metrics, budget=budget)
    for n in range(4):
        assert queue.put(msg(str(n)), 1, Pub(), persistent=True) == STORED
    with caplog.at_level(logging.ERROR, logger="polygate.queues"):
        assert queue.put(msg("refusable"), 1, Pub(refusable=True), persistent=True) == REFUSED
        assert queue.put(msg("mqtt311"), 1, Pub(refusable=False), persistent=True) == 0
        assert queue.put(msg("nobody"), 1, NO_PUBLISHER, persistent=True) == 0
        assert queue.persist(msg("inflight"), 1) == 0  # nothing written
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_numbers_exhausted"): 4}
    assert any(getattr(r, "event", None) == "queue_numbers_exhausted" for r in caplog.records)
    assert payloads(queue) == [b"0", b"1", b"2", b"3"] and budget.messages == 4
    assert store.payloads(KEY) == [b"0", b"1", b"2", b"3"] and store.ops("renumber") == []
    # A message that needs no row still goes into memory.
    assert queue.put(msg("qos0", qos=0), 0) == 0 and payloads(queue)[-1] == b"qos0"
    # Once it has been empty, numbering starts again.
    while queue:
        queue.settle(queue.popleft()[2])
    assert queue.put(msg("again"), 1, persistent=True) == STORED
    assert store.ops("renumber") == [("renumber", KEY)] and queue.entries[0][2] == 1


def test_a_paging_queue_out_of_numbers_refuses_what_it_would_page() -> None:
    store = RecordingStore(max_seq=3)
    metrics = Metrics()
    queue = make_queue(100, store=store, key=KEY, window=2, metrics=metrics)
    for n in range(3):
        queue.put(msg(str(n)), 0, Pub())  # not persistent: the third is paged, seq 1
    assert queue.paged == 1 and [call[2] for call in store.ops("add")] == [1]
    queue.put(msg("3"), 0, Pub())
    queue.put(msg("4"), 0, Pub())
    assert queue.put(msg("5"), 0, Pub()) == REFUSED  # it would have to be paged: no number left
    assert len(queue) == 5 and queue.paged == 3
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_numbers_exhausted"): 1}


def test_a_restored_queue_past_half_its_numbers_renumbers_once_empty() -> None:
    store = RecordingStore(max_seq=100)
    store.add_message(KEY, 90, msg("kept"), 1)
    queue = make_queue(100, store=store, key=KEY)
    queue.restore(StoredQueue(key=KEY, meta={}, head=store.select(KEY, 0, 10), count=1, last_seq=90))
    assert queue.put(msg("next"), 1, persistent=True) == STORED and queue.entries[-1][2] == 91
    while queue:
        queue.settle(queue.popleft()[2])
    assert store.payloads(KEY) == []
    assert queue.put(msg("fresh"), 1, persistent=True) == STORED
    assert store.ops("renumber") == [("renumber", KEY)] and queue.entries[0][2] == 1


def test_a_read_asked_for_before_a_renumber_is_not_taken_for_the_new_numbers() -> None:
    store = RecordingStore(max_seq=6, auto_read=False)
    metrics = Metrics()
    queue = make_queue(100, 6, DROP_OLDEST, store=store, key=KEY, window=2, metrics=metrics)
    for name in ("a", "b", "c", "d"):
        queue.put(msg("x", topic=name), 1, persistent=True)  # a b in memory, c d paged (seqs 3 4)
    queue.settle(queue.popleft()[2])  # a read for `c` is asked for
    queue.settle(queue.popleft()[2])
    assert len(store.reads) == 1 and not queue.entries and queue.paged == 2
    queue.put(msg("xxxxxx", topic="big"), 1, persistent=True)  # 6 bytes: c and d go
    # Their rows wait for the read that removes them, so the numbering does not start again under it.
    assert store.ops("renumber") == []
    while store.answer_reads():  # the answers hold c, then d: their rows are removed, nothing of it is queued
        pass
    assert [m.topic for m, _, _ in queue.entries] == ["big"] and queue.paged == 0
    assert [p for p in store.payloads(KEY)] == [b"xxxxxx"]
    queue.settle(queue.popleft()[2])  # now no row is left: the next message starts the numbering again
    assert queue.put(msg("", topic="e"), 1, persistent=True) == STORED
    assert store.ops("renumber") == [("renumber", KEY)] and queue.entries[0][2] == 1
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_full"): 2}


# -- properties -------------------------------------------------------------------------------------------

_PUBLISHERS = ("refusable", "mqtt311", "none")

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 12), st.sampled_from(["t", "a/b/c"]), st.booleans(),
                  st.sampled_from(_PUBLISHERS)),
        st.tuples(st.just("popleft")),
        st.tuples(st.just("appendleft")),
        st.tuples(st.just("settle")),
        st.tuples(st.just("clear")),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from([DROP_OLDEST, REJECT_NEW, BLOCK]),
    max_messages=st.integers(1, 5),
    max_bytes=st.integers(1, 30),
    high=st.sampled_from([0, 500, 1000]),
    ops=_ops,
)
def test_counts_bytes_and_budget_follow_a_simple_model(policy: str, max_messages: int, max_bytes: int, high: int,
                                                       ops: list[tuple[Any, ...]]) -> None:
    budget = MemoryBudget(high)
    metrics = Metrics()
    queue = make_queue(max_messages, max_bytes, policy, budget=budget, metrics=metrics, qos0=True)
    pubs = {"refusable": Pub(True, "refusable"), "mqtt311": Pub(False, "mqtt311")}
    publishers: dict[str, Publisher] = {**pubs, "none": NO_PUBLISHER}
    model: deque[tuple[Message, int]] = deque()
    held: set[str] = set()
    popped: list[tuple[Message, int, int]] = []
    over_bound_allowed = False
    counter = 0
    for op in ops:
        kind = op[0]
        if kind == "put":
            _, size, topic, qos0, who = op
            counter += 1
            message = Message(topic, bytes([counter % 256]) * size, 0 if qos0 else 1)
            meta = 0 if qos0 else 1
            publisher = publishers[who]
            used = sum(len(m.payload) for m, _ in model)
            full = len(model) >= max_messages or used + size > max_bytes
            status = queue.put(message, meta, publisher)
            taken = True
            if full and model:
                if policy == DROP_OLDEST:
                    while model and (len(model) >= max_messages or sum(len(m.payload) for m, _ in model) + size > max_bytes):
                        scan = [i for i, (_, mt) in enumerate(list(model)[:queues_module.QOS0_SCAN]) if mt == 0]
                        del model[scan[0] if scan else 0]
                    if size > max_bytes:
                        over_bound_allowed = True  # everything dropped, and it is larger than the bound alone
                elif policy == REJECT_NEW and publisher.refusable:
                    taken = False
                else:
                    over_bound_allowed = True
                    if publisher is not NO_PUBLISHER:
                        held.add(who)
            elif full:
                over_bound_allowed = True  # one message over the byte bound into an empty queue
            if taken:
                model.append((message, meta))
                assert status == 0
            else:
                assert status == (REFUSED if publisher is not NO_PUBLISHER else 0)
        elif kind == "popleft" and model:
            entry = queue.popleft()
            assert (entry[0], entry[1]) == model.popleft()
            popped.append(entry)
            used = sum(len(m.payload) for m, _ in model)
            if len(model) <= max_messages // 2 and used <= max_bytes // 2:
                held.clear()
        elif kind == "appendleft" and popped:
            entry = popped.pop()
            queue.appendleft(entry)
            model.appendleft((entry[0], entry[1]))
            over_bound_allowed = True
        elif kind == "settle" and popped:
            queue.settle(popped.pop(0)[2])  # not durable: nothing happens
        elif kind == "clear":
            assert queue.clear() == len(model)
            model.clear()
            held.clear()
        # The queue is what the model says, in order.
        assert [(e[0], e[1]) for e in queue.entries] == list(model)
        assert len(queue) == len(model) and bool(queue) == bool(model)
        assert queue.bytes == sum(len(m.payload) for m, _ in model) >= 0
        assert queue.paged == 0
        # The budget counts exactly what waits in memory (all of it transient: no store).
        assert budget.messages == len(model) == budget.transient >= 0
        assert budget.used == sum(cost(m) for m, _ in model) >= 0
        if high:
            if budget.used > high:
                assert budget.alarm
            if budget.used < budget.low:
                assert not budget.alarm
        # Held publishers: exactly those the model holds.
        assert {name for name, pub in pubs.items() if pub.holders} == held
        # The bound holds, except after a block/held take, an appendleft or one oversize message.
        if len(model) <= max_messages and queue.bytes <= max_bytes and not held:
            over_bound_allowed = False
        if not over_bound_allowed:
            assert len(queue) <= max_messages and queue.bytes <= max_bytes
    assert queue.clear() == len(model)
    assert budget.used == 0 and budget.messages == 0 and queue.bytes == 0


_durable_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 6), st.booleans()),
        st.tuples(st.just("popleft")),
        st.tuples(st.just("settle")),
        st.tuples(st.just("answer")),
        st.tuples(st.just("purge")),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(policy=st.sampled_from([DROP_OLDEST, REJECT_NEW, BLOCK]), max_messages=st.integers(3, 12),
       window=st.integers(2, 5), max_seq=st.sampled_from([None, 6, 15]), ops=_durable_ops)
def test_a_paging_durable_queue_keeps_order_rows_and_counts(policy: str, max_messages: int, window: int,
                                                            max_seq: int | None, ops: list[tuple[Any, ...]]) -> None:
    """Rows in the store always match the queue, with drops, purges under a pending read, renumbering."""
    store = RecordingStore(auto_read=False, max_seq=max_seq)
    budget = MemoryBudget(0)
    metrics = Metrics()
    queue = make_queue(max_messages, 10**6, policy, store=store, key=KEY, window=window, budget=budget,
                       metrics=metrics)
    exhausted = (Protocol.MQTT, "queue_numbers_exhausted")
    model: deque[tuple[bytes, bool]] = deque()  # (payload, persistent) of every waiting message, in order
    unsettled: list[tuple[int, bool]] = []  # (seq, persistent) popped, not yet settled
    counter = 0
    for op in ops:
        kind = op[0]
        if kind == "put":
            _, size, persistent = op
            counter += 1
            payload = bytes([counter % 256]) * size
            full = len(model) >= max_messages
            if full and policy == DROP_OLDEST:
                while len(model) >= max_messages:
                    model.popleft()
            refused_before = metrics.messages_dropped.get(exhausted, 0)
            status = queue.put(Message("t", payload, 1 if persistent else 0), 1, Pub(), persistent=persistent)
            assert status in (0, STORED, REFUSED)
            if full and policy == REJECT_NEW:
                assert status == REFUSED
            elif status == REFUSED:
                # Out of sequence numbers: the last one given out was max_seq, and rows are still there.
                assert metrics.messages_dropped[exhausted] == refused_before + 1
                assert store.ops("add")[-1][2] == store.max_seq and store.rows.get(KEY)
            else:
                model.append((payload, persistent))
                if persistent:
                    assert status == STORED
        elif kind == "popleft" and queue.entries:
            message, _, seq = queue.popleft()
            payload, persistent = model.popleft()
            assert message.payload == payload
            unsettled.append((seq, persistent))
        elif kind == "settle" and unsettled:
            seq, _ = unsettled.pop(0)
            queue.settle(seq)
        elif kind == "answer":
            store.answer_reads()
        elif kind == "purge":  # also under a pending read: its answer is ignored
            assert queue.purge() == len(model)
            model.clear()
        assert len(queue) == len(model)
        assert [e[0].payload for e in queue.entries] == [p for p, _ in list(model)[:len(queue.entries)]]
        assert len(queue.entries) <= max(window, 1) or not queue.paged
        assert queue.paged == len(model) - len(queue.entries) == budget.paged
        assert budget.messages == len(queue.entries)
        assert budget.transient == sum(1 for e in queue.entries if not e[2])  # in memory only: a stop loses them
        assert queue.bytes >= 0
        if not queue.paged:
            assert queue.bytes == sum(len(p) for p, _ in model)
        if queue.paged and not queue.entries:
            assert store.reads, "paged messages but nothing in memory and no read on its way"
        # The store holds a row for every waiting persistent message, every paged one, every unsettled one.
        memory = {e[2] for e in queue.entries if e[2]}
        rows = set(store.rows.get(KEY, {}))
        unsettled_seqs = {seq for seq, _ in unsettled if seq}
        assert memory | unsettled_seqs <= rows
        assert len(rows - memory - unsettled_seqs) == queue.paged
        # A persistent message always has its row; a non-persistent one only once it was paged out.
        for entry, (_, persistent) in zip(queue.entries, model):
            assert entry[2] or not persistent
    # Drain: everything comes back in order.
    rest = []
    while queue:
        while queue.entries:
            message, _, seq = queue.popleft()
            rest.append(message.payload)
            queue.settle(seq)
        assert store.answer_reads() or not queue
    assert rest == [p for p, _ in model]
    for seq, _ in unsettled:
        queue.settle(seq)
    assert store.rows.get(KEY, {}) == {} and queue.bytes == 0 and budget.used == 0 and budget.paged == 0
