"""MQTT session bookkeeping: packet ids, the in-flight window, QoS 2 states, redelivery."""

from __future__ import annotations

from gateway.backpressure import Blocker
from gateway.events import Identity, Protocol
from gateway.metrics import Metrics
from gateway.mqtt.session import Session, SessionRegistry
from gateway.router import Message, Router


class Output:
    """Records what a session sends, as (kind, packet id, message payload, qos, dup)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int | None, bytes, int, bool]] = []
        self.open = True

    def can_send(self) -> bool:
        return self.open

    def throttle(self, blocker: Blocker) -> None:
        pass

    def unthrottle(self, blocker: Blocker) -> None:
        pass

    def send_publish(self, message: Message, qos: int, retain: bool, dup: bool, packet_id: int | None) -> None:
        self.sent.append(("publish", packet_id, message.payload, qos, dup))

    def send_pubrel(self, packet_id: int) -> None:
        self.sent.append(("pubrel", packet_id, b"", 2, False))


def make_session(max_inflight: int = 10, max_queued: int = 100, metrics: Metrics | None = None) -> Session:
    return Session(
        "c1", clean=False, identity=Identity(external_id="u"), max_inflight=max_inflight,
        max_queued=max_queued, metrics=metrics or Metrics(),
    )


def message(n: int, qos: int = 1) -> Message:
    return Message("t", str(n).encode(), qos)


def ids(output: Output) -> list[int | None]:
    return [packet_id for _, packet_id, _, _, _ in output.sent]


def test_packet_ids_count_up_wrap_and_skip_ids_still_in_flight() -> None:
    session, output = make_session(), Output()
    session.attach(output)
    session._next_id = 65_533
    for n in range(3):
        session.deliver(message(n), 1, False)
    assert ids(output) == [65_534, 65_535, 1]
    session.puback(65_534)
    session.puback(1)
    # 65_535 is still in flight when the ids come round again: it is skipped.
    session._next_id = 65_534
    session.deliver(message(3), 1, False)
    session.deliver(message(4), 1, False)
    assert ids(output)[3:] == [1, 2]
    assert list(session.inflight) == [65_535, 1, 2]


def test_window_full_queues_and_each_ack_sends_the_next() -> None:
    session, output = make_session(max_inflight=2), Output()
    session.attach(output)
    for n in range(4):
        session.deliver(message(n), 1, False)
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
    session.deliver(message(0, 2), 2, False)
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
    session.deliver(message(0, 1), 1, False)
    session.deliver(message(1, 2), 2, False)
    session.deliver(message(2, 2), 2, False)
    session.deliver(message(3, 1), 1, False)
    # The second message moves to "awaiting PUBCOMP": it keeps its place in the order.
    assert session.pubrec(2)
    session.detach(first)
    session.deliver(message(4, 1), 1, False)  # offline: queued
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
    session.deliver(message(0, 0), 0, False)  # offline QoS 0
    output = Output()
    session.attach(output)
    session.deliver(message(1), 1, False)  # in flight
    session.deliver(message(2), 1, False)  # queued
    session.deliver(message(3), 1, False)  # queue full
    assert metrics.messages_dropped[(Protocol.MQTT, "offline_qos0")] == 1
    assert metrics.messages_dropped[(Protocol.MQTT, "queue_full")] == 1


def test_discard_clears_the_session() -> None:
    router = Router()
    registry = SessionRegistry(router)
    session = make_session(max_inflight=1)
    registry.sessions["c1"] = session
    session.attach(Output())
    router.subscribe(session, "t", 2)
    session.deliver(message(0, 2), 2, False)
    session.deliver(message(1), 1, False)
    registry.discard(session)
    assert not session.inflight and not session.queue
    assert "c1" not in registry.sessions and router.subscriptions(session) == {}
