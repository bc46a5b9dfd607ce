"""MQTT session bookkeeping: packet ids, the in-flight window, QoS 2 states, redelivery, durability, expiry."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.backpressure import NO_PUBLISHER
from gateway.events import Identity, Protocol
from gateway.metrics import Metrics
from gateway.mqtt.session import KEY_PREFIX, RETAIN_FLAG, Session, SessionRegistry
from gateway.queues import BLOCK, DROP_OLDEST, REFUSED, REJECT_NEW, STORED, MemoryBudget, QueueLimits
from gateway.router import Message, Router
from gateway.store.base import Store, StoredQueue
from gateway.store.memory import MemoryStore
from tests.unit.store_doubles import RecordingStore
from tests.unit.publisher_doubles import FakePublisher




class Output:
    """Records what a session sends, as (kind, packet id, message payload, qos, dup)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None, bytes, int, bool]] = []
        self.open = True
        self.publisher = FakePublisher()

    def can_send(self) -> bool:
        return self.open

    def send_publish(self, message: Message, qos: int, retain: bool, dup: bool, packet_id: int | None) -> None:
        self.sent.append(("publish", packet_id, message.payload, qos, dup))

    def send_pubrel(self, packet_id: int) -> None:
        self.sent.append(("pubrel", packet_id, b"", 2, False))


ALICE = Identity(external_id="u-1", tenant="t", username="alice")


def make_session(
    max_inflight: int = 10,
    max_queued: int = 100,
    metrics: Metrics | None = None,
    *,
    store: Store | None = None,
    clean: bool = False,
    overflow: str = DROP_OLDEST,
    budget: MemoryBudget | None = None,
    client_id: str = "c1",
) -> Session:
    return Session(
        client_id, clean=clean, identity=ALICE, max_inflight=max_inflight,
        limits=QueueLimits(max_queued, 10**9, overflow), budget=budget or MemoryBudget(0),
        metrics=metrics or Metrics(), store=store,
    )


def make_registry(router: Router, store: Store, *, expiry: float = 3600.0, max_queued: int = 100) -> SessionRegistry:
    return SessionRegistry(router, store=store, limits=QueueLimits(max_queued, 10**9, DROP_OLDEST), metrics=Metrics(),
                           max_inflight=10, session_expiry=expiry)


def message(n: int, qos: int = 1) -> Message:
    return Message("t", str(n).encode(), qos)


def ids(output: Output) -> list[int | None]:
    return [packet_id for _, packet_id, _, _, _ in output.sent]


def test_packet_ids_count_up_wrap_and_skip_ids_still_in_flight() -> None:
    session, output = make_session(), Output()
    session.attach(output)
    session._next_id = 65_533
    for n in range(3):
        session.deliver(message(n), 1, False, NO_PUBLISHER)
    assert ids(output) == [65_534, 65_535, 1]
    session.puback(65_534)
    session.puback(1)
    # 65_535 is still in flight when the ids come round again: it is skipped.
    session._next_id = 65_534
    session.deliver(message(3), 1, False, NO_PUBLISHER)
    session.deliver(message(4), 1, False, NO_PUBLISHER)
    assert ids(output)[3:] == [1, 2]
    assert list(session.inflight) == [65_535, 1, 2]


def test_window_full_queues_and_each_ack_sends_the_next() -> None:
    session, output = make_session(max_inflight=2), Output()
    session.attach(output)
    for n in range(4):
        session.deliver(message(n), 1, False, NO_PUBLISHER)
    assert [payload for _, _, payload, _, _ in output.sent] == [b"0", b"1"]
    assert len(session.queue) == 2
    assert session.puback(1)
    assert [payload for _, _, payload, _, _ in output.sent] == [b"0", b"1", b"2"]
    assert not session.puback(1)  # already acknowledged
    assert session.puback(2) and session.puback(3) and session.puback(4)
    assert not session.inflight and not session.queue


def test_qos2_states_accept_only_the_next_step() -> None:
    session, output = make_session(), Output()
    session.attach(output)
    session.deliver(message(0, 2), 2, False, NO_PUBLISHER)
    (packet_id,) = ids(output)
    assert packet_id is not None
    assert not session.puback(packet_id)  # a QoS 2 message is not done by PUBACK
    assert not session.pubcomp(packet_id)  # nor by PUBCOMP before PUBREC
    assert session.pubrec(packet_id)
    assert session.pubrec(packet_id)  # a repeated PUBREC is answered with PUBREL again
    assert not session.puback(packet_id)
    assert session.pubcomp(packet_id)
    assert not session.pubcomp(packet_id)
    assert not session.inflight


def test_reattach_redelivers_in_order_with_dup_and_pubrel_for_released_ones() -> None:
    session, first = make_session(), Output()
    session.attach(first)
    session.deliver(message(0, 1), 1, False, NO_PUBLISHER)
    session.deliver(message(1, 2), 2, False, NO_PUBLISHER)
    session.deliver(message(2, 2), 2, False, NO_PUBLISHER)
    session.deliver(message(3, 1), 1, False, NO_PUBLISHER)
    # The second message moves to "awaiting PUBCOMP": it keeps its place in the order.
    assert session.pubrec(2)
    session.detach(first)
    session.deliver(message(4, 1), 1, False, NO_PUBLISHER)  # offline: queued
    again = Output()
    session.attach(again)
    assert again.sent == [
        ("publish", 1, b"0", 1, True),
        ("pubrel", 2, b"", 2, False),
        ("publish", 3, b"2", 2, True),
        ("publish", 4, b"3", 1, True),
        ("publish", 5, b"4", 1, False),
    ]


def test_offline_qos0_and_full_queue_are_counted_drops() -> None:
    metrics = Metrics()
    session = make_session(max_inflight=1, max_queued=1, metrics=metrics)
    session.deliver(message(0, 0), 0, False, NO_PUBLISHER)  # offline QoS 0
    output = Output()
    session.attach(output)
    session.deliver(message(1), 1, False, NO_PUBLISHER)  # in flight
    session.deliver(message(2), 1, False, NO_PUBLISHER)  # queued
    session.deliver(message(3), 1, False, NO_PUBLISHER)  # queue full
    assert metrics.messages_dropped[(Protocol.MQTT, "offline_qos0")] == 1
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1


def test_discard_clears_the_session() -> None:
    router = Router()
    registry = make_registry(router, MemoryStore())
    session = make_session(max_inflight=1)
    registry.sessions["c1"] = session
    session.attach(Output())
    router.subscribe(session, "t", 2)
    session.deliver(message(0, 2), 2, False, NO_PUBLISHER)
    session.deliver(message(1), 1, False, NO_PUBLISHER)
    registry.discard(session)
    assert not session.inflight and not session.queue
    assert "c1" not in registry.sessions and router.subscriptions(session) == {}


# -- backpressure -----------------------------------------------------------------------------------


async def test_a_full_block_queue_holds_a_publisher_but_never_the_sessions_own_connection() -> None:
    session, output = make_session(max_inflight=1, max_queued=2, overflow=BLOCK), Output()
    session.attach(output)
    other = FakePublisher()
    for n in range(3):
        session.deliver(message(n), 1, False, other)  # one in flight, two queued
    assert not other.gate.held
    assert session.deliver(message(3), 1, False, other) == 0  # taken over the bound ...
    assert other.gate.held and len(session.queue) == 3  # ... and its publisher held
    session.deliver(message(4), 1, False, output.publisher)
    assert not output.publisher.gate.held  # its acks are what drain the queue
    for packet_id in range(1, 5):
        assert session.puback(packet_id)
    assert not other.gate.held


async def test_reject_new_refuses_a_refusable_publisher_and_holds_one_that_cannot_be_told() -> None:
    metrics = Metrics()
    session = make_session(max_queued=1, overflow=REJECT_NEW, metrics=metrics)
    session.attach(Output())
    session.output.open = False  # type: ignore[union-attr]
    refusable, mqtt311 = FakePublisher(refusable=True), FakePublisher(refusable=False)
    assert session.deliver(message(0), 1, False, refusable) == 0
    assert session.deliver(message(1), 1, False, refusable) == 4  # REFUSED
    assert session.deliver(message(2), 1, False, mqtt311) == 0  # taken, publisher held
    assert mqtt311.gate.held and not refusable.gate.held
    assert [m.payload for m, _, _ in session.queue.entries] == [b"0", b"2"]
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1
    session.detach(session.output)  # type: ignore[arg-type]
    assert not mqtt311.gate.held  # a detached session lets its publishers go


# -- durable sessions -------------------------------------------------------------------------------


def test_a_durable_session_writes_qos1_deliveries_until_puback() -> None:
    store = RecordingStore()
    session, output = make_session(store=store), Output()
    assert session.durable and session.queue.durable
    key = KEY_PREFIX + "c1"
    session.attach(output)
    assert session.deliver(message(0, 1), 1, False, NO_PUBLISHER) == STORED
    assert session.deliver(message(1, 1), 1, True, NO_PUBLISHER) == STORED
    assert store.ops("add") == [("add", key, 1, b"0", 1), ("add", key, 2, b"1", 1 | RETAIN_FLAG)]
    assert session.puback(2)
    assert store.ops("remove") == [("remove", key, 2)]
    assert store.payloads(key) == [b"0"]
    assert session.puback(1)
    assert store.payloads(key) == []


def test_a_durable_session_writes_qos2_until_pubrec() -> None:
    store = RecordingStore()
    session, output = make_session(store=store), Output()
    key = KEY_PREFIX + "c1"
    session.attach(output)
    assert session.deliver(message(0, 2), 2, False, NO_PUBLISHER) == STORED
    assert store.payloads(key) == [b"0"]
    assert session.pubrec(1)
    assert store.payloads(key) == []  # the client owns it now
    assert session.pubrec(1)  # repeated PUBREC: nothing more to remove
    assert store.ops("remove") == [("remove", key, 1)]
    assert session.pubcomp(1)


def test_a_durable_session_does_not_write_qos0() -> None:
    store = RecordingStore()
    session, output = make_session(store=store, max_inflight=1), Output()
    session.attach(output)
    assert session.deliver(message(0, 0), 0, False, NO_PUBLISHER) == 0  # sent at once
    assert session.deliver(message(1, 1), 1, False, NO_PUBLISHER) == STORED  # in flight
    assert session.deliver(message(2, 1), 1, False, NO_PUBLISHER) == STORED  # queued behind the window
    assert session.deliver(message(3, 0), 0, False, NO_PUBLISHER) == 0  # queued, in memory only
    assert [call[3] for call in store.ops("add")] == [b"1", b"2"]
    assert session.puback(1)  # the queued QoS 1 goes out with its seq, then the QoS 0
    assert output.sent[-2:] == [("publish", 2, b"2", 1, False), ("publish", None, b"3", 0, False)]
    assert session.puback(2)
    assert store.payloads(KEY_PREFIX + "c1") == []
    session.detach(output)
    session.deliver(message(4, 0), 0, False, NO_PUBLISHER)  # offline QoS 0 is dropped
    assert len(store.ops("add")) == 2


def test_clean_and_memory_backed_sessions_write_nothing() -> None:
    store = RecordingStore()
    clean = make_session(store=store, clean=True)
    in_memory = make_session(store=MemoryStore())
    for session in (clean, in_memory):
        assert not session.durable
        session.attach(Output())
        assert session.deliver(message(0, 1), 1, False, NO_PUBLISHER) == 0
        session.save()
    assert store.calls == []


def test_save_writes_identity_subscriptions_and_expiry() -> None:
    store = RecordingStore()
    router = Router()
    session = make_session(store=store)
    session.subscribe(router, "a/#", 1, ("a/secret",))
    session.subscribe(router, "b", 2, ())
    meta = store.queues[KEY_PREFIX + "c1"]
    assert meta == {
        "kind": "mqtt", "client_id": "c1",
        "identity": {"external_id": "u-1", "tenant": "t", "username": "alice", "superuser": False},
        "subscriptions": {"a/#": [1, ["a/secret"]], "b": [2, []]},
        "expires_at": None,
    }
    session.unsubscribe(router, "b")
    assert store.queues[KEY_PREFIX + "c1"]["subscriptions"] == {"a/#": [1, ["a/secret"]]}
    assert router.subscriptions(session) == {"a/#": 1}


# -- the registry: expiry and restore ---------------------------------------------------------------


async def test_disconnected_sets_expires_at_and_expiry_discards_the_session() -> None:
    store = RecordingStore()
    router = Router()
    registry = make_registry(router, store, expiry=0.05)
    session = registry.create("c1", clean=False, identity=ALICE)
    assert ("put_queue", KEY_PREFIX + "c1") == store.calls[0][:2]
    session.subscribe(router, "t/#", 1, ())
    output = Output()
    session.attach(output)
    registry.connected(session)
    session.deliver(message(0, 1), 1, False, NO_PUBLISHER)  # in flight, unacknowledged
    session.detach(output)
    before = time.time()
    registry.disconnected(session)
    assert session.expires_at is not None and before + 0.04 <= session.expires_at <= time.time() + 0.06
    assert store.queues[KEY_PREFIX + "c1"]["expires_at"] == session.expires_at
    router.publish(Message("t/x", b"queued", 1))  # offline: queued and written
    assert len(session.queue) == 1 and len(store.payloads(KEY_PREFIX + "c1")) == 2
    await asyncio.sleep(0.12)
    assert "c1" not in registry.sessions
    assert router.subscriptions(session) == {}
    assert store.ops("delete_queue") == [("delete_queue", KEY_PREFIX + "c1")]
    assert KEY_PREFIX + "c1" not in store.queues and store.payloads(KEY_PREFIX + "c1") == []
    assert not session.queue and not session.inflight
    assert registry.metrics.messages_dropped[(Protocol.MQTT, "session_expired")] == 2


async def test_reconnecting_in_time_cancels_the_expiry() -> None:
    store = RecordingStore()
    router = Router()
    registry = make_registry(router, store, expiry=0.03)
    session = registry.create("c1", clean=False, identity=ALICE)
    registry.disconnected(session)
    output = Output()
    session.attach(output)
    registry.connected(session)
    assert session.expires_at is None
    assert store.queues[KEY_PREFIX + "c1"]["expires_at"] is None
    await asyncio.sleep(0.08)
    assert registry.sessions["c1"] is session
    assert store.ops("delete_queue") == []


async def test_a_clean_session_is_not_scheduled_to_expire() -> None:
    registry = make_registry(Router(), RecordingStore(), expiry=0.0)
    session = registry.create("c1", clean=True, identity=ALICE)
    registry.disconnected(session)
    assert session.expires_at is None
    await asyncio.sleep(0.01)
    assert registry.sessions["c1"] is session  # the connection discards a clean session itself


def stored_session(client_id: str, *, expires_at: float | None, head: list[tuple[int, Message, int]],
                   subscriptions: dict[str, list[object]] | None = None, count: int | None = None) -> StoredQueue:
    return StoredQueue(
        key=KEY_PREFIX + client_id,
        meta={
            "kind": "mqtt", "client_id": client_id,
            "identity": {"external_id": "u-" + client_id, "tenant": "", "username": client_id, "superuser": False},
            "subscriptions": subscriptions or {},
            "expires_at": expires_at,
        },
        head=head, count=len(head) if count is None else count, last_seq=max((seq for seq, _, _ in head), default=0),
    )


async def test_restore_rebuilds_sessions_with_subscriptions_and_queued_messages() -> None:
    store = RecordingStore()
    router = Router()
    registry = make_registry(router, store)
    kept = stored_session(
        "keep", expires_at=time.time() + 600,
        head=[(3, Message("a/1", b"one", 1), 1), (5, Message("a/2", b"two", 2), 2 | RETAIN_FLAG)],
        subscriptions={"a/#": [2, ["a/secret"]], "b": [1, []]},
    )
    was_online = stored_session("online", expires_at=None, head=[])
    registry.restore([kept, was_online])
    session = registry.sessions["keep"]
    assert session.identity == Identity(external_id="u-keep", username="keep")
    assert session.durable and not session.clean
    assert session.subscriptions == {"a/#": (2, ("a/secret",)), "b": (1, ())}
    assert router.subscriptions(session) == {"a/#": 2, "b": 1}
    assert [(m.payload, meta, seq) for m, meta, seq in session.queue.entries] == [(b"one", 1, 3), (b"two", 6, 5)]
    # A session that was online when the gateway stopped is offline from now on.
    assert registry.sessions["online"].expires_at == pytest.approx(time.time() + 3600, abs=5)
    # The router reaches the restored session; its exclusions still apply.
    router.publish(Message("a/secret", b"no", 1))
    router.publish(Message("a/3", b"three", 1))
    assert [m.payload for m, _, _ in session.queue.entries] == [b"one", b"two", b"three"]
    assert store.payloads(KEY_PREFIX + "keep") == [b"three"]  # a new seq after the restored ones
    assert store.ops("add")[0][2] == 6
    # Attaching sends what was kept, in order, as new deliveries; the acks remove the rows.
    output = Output()
    session.attach(output)
    registry.connected(session)
    assert output.sent == [("publish", 1, b"one", 1, False), ("publish", 2, b"two", 2, False),
                           ("publish", 3, b"three", 1, False)]
    assert session.puback(1) and session.pubrec(2) and session.puback(3)
    assert [call[2] for call in store.ops("remove")] == [3, 5, 6]


async def test_restore_discards_an_expired_session_and_an_unreadable_one() -> None:
    store = RecordingStore()
    router = Router()
    registry = make_registry(router, store)
    expired = stored_session("old", expires_at=time.time() - 1, head=[(1, Message("t", b"x", 1), 1)],
                             subscriptions={"t": [1, []]})
    broken = StoredQueue(key=KEY_PREFIX + "broken", meta={"client_id": "broken"}, head=[], count=0)
    registry.restore([expired, broken])
    assert registry.sessions == {}
    assert router.subscription_count == 0
    assert router.publish(Message("t", b"y", 1)) == 0
    assert sorted(store.ops("delete_queue")) == [("delete_queue", KEY_PREFIX + "broken"), ("delete_queue", KEY_PREFIX + "old")]
    assert registry.metrics.messages_dropped[(Protocol.MQTT, "session_expired")] == 1


async def test_a_restored_session_expires_at_its_stored_time() -> None:
    store = RecordingStore()
    registry = make_registry(Router(), store)
    registry.restore([stored_session("soon", expires_at=time.time() + 0.03, head=[])])
    assert "soon" in registry.sessions
    await asyncio.sleep(0.1)
    assert "soon" not in registry.sessions
    assert store.ops("delete_queue") == [("delete_queue", KEY_PREFIX + "soon")]


async def test_a_full_reject_new_session_keeps_what_its_own_mqtt311_connection_publishes() -> None:
    """Its own connection is never held by its session (its acks drain it), and what it cannot be
    told was refused is taken over the bound: nothing it was acknowledged is lost."""
    metrics = Metrics()
    session = make_session(max_inflight=1, max_queued=1, overflow=REJECT_NEW, metrics=metrics)
    output = Output()
    output.publisher.refusable = False  # MQTT 3.1.1 QoS 1: cannot be told "refused"
    session.attach(output)
    output.open = False
    assert session.deliver(message(1), 1, False, output.publisher) == 0
    assert session.deliver(message(2), 1, False, output.publisher) == 0
    assert not output.publisher.gate.held  # its own acks drain the queue: never held
    assert [m.payload for m, _, _ in session.queue.entries] == [b"1", b"2"]
    assert metrics.messages_dropped == {}


async def test_a_full_reject_new_session_refuses_its_own_mqtt5_connection_without_holding_it() -> None:
    metrics = Metrics()
    session = make_session(max_inflight=1, max_queued=1, overflow=REJECT_NEW, metrics=metrics)
    output = Output()  # its publisher is refusable (MQTT 5: a PUBACK reason code says so)
    session.attach(output)
    output.open = False
    assert session.deliver(message(1), 1, False, output.publisher) == 0
    assert session.deliver(message(2), 1, False, output.publisher) == REFUSED
    assert not output.publisher.gate.held
    assert [m.payload for m, _, _ in session.queue.entries] == [b"1"]
    assert metrics.messages_dropped == {(Protocol.MQTT, "queue_full"): 1}
    # Another connection's publisher that cannot be told is held as before.
    mqtt311 = FakePublisher(refusable=False)
    assert session.deliver(message(3), 1, False, mqtt311) == 0
    assert mqtt311.gate.held and not output.publisher.gate.held


async def test_a_session_out_of_sequence_numbers_does_not_report_an_unwritten_message_stored() -> None:
    store = RecordingStore(max_seq=1)
    session, output = make_session(store=store), Output()
    session.attach(output)
    publisher = FakePublisher(refusable=True)
    assert session.deliver(message(1), 1, False, publisher) == STORED  # seq 1, in flight
    status = session.deliver(message(2), 1, False, publisher)  # no number left
    written = b"2" in store.payloads(KEY_PREFIX + "c1")
    assert written or status == REFUSED, f"status {status}: neither written nor refused"
