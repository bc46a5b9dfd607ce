"""AMQP 0.9.1 topic mapping, SASL responses, and queue/channel bookkeeping without sockets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st
from pamqp import encode

from gateway.amqp091.broker import AMQPMessage, Broker, envelope
from gateway.amqp091.channel import Channel
from gateway.amqp091.framing import (
    ACCESS_REFUSED,
    NOT_FOUND,
    PRECONDITION_FAILED,
    PROPERTIES_NONE,
    PROPERTIES_PERSISTENT,
    RESOURCE_LOCKED,
    ChannelError,
    exchange_and_key,
)
from gateway.amqp091.routing import (
    PublishRoutes,
    binding_key_to_filter,
    publish_topic,
    routing_key_to_topic,
    topic_to_routing_key,
)
from gateway.amqp091.sasl import SASLError, parse_response
from gateway.errors import InvalidTopic
from gateway.events import Identity, Protocol
from gateway.metrics import Metrics
from gateway.router import Message, Router

ALICE = Identity(external_id="alice", username="alice")
BOB = Identity(external_id="bob", username="bob")
ROOT = Identity(external_id="root", username="root", superuser=True)


# -- routing keys and binding keys ----------------------------------------------------------------


@pytest.mark.parametrize(("key", "topic"), [
    ("a.b.c", "a/b/c"),
    ("v1/x.y", "v1.x/y"),
    ("a..b", "a//b"),
    ("single", "single"),
])
def test_routing_key_is_a_topic_with_dots_and_slashes_swapped(key: str, topic: str) -> None:
    assert routing_key_to_topic(key) == topic
    assert topic_to_routing_key(topic) == key
    assert publish_topic(key, 1024) == topic


@given(st.text(alphabet="ab./+#$", max_size=20))
def test_mapping_is_its_own_inverse(text: str) -> None:
    assert routing_key_to_topic(topic_to_routing_key(text)) == text


@pytest.mark.parametrize("key", ["", "a.#", "#", "+", "a.b+"])
def test_routing_keys_that_name_no_topic_are_refused(key: str) -> None:
    with pytest.raises(InvalidTopic):
        publish_topic(key, 1024)


def test_publish_routes_remember_topic_and_encoded_key() -> None:
    routes = PublishRoutes(1024, size=3)
    assert routes.learn("a.b") == ("a/b", exchange_and_key("amq.topic", "a.b"))
    assert routes.known["a.b"] == ("a/b", exchange_and_key("amq.topic", "a.b"))
    with pytest.raises(InvalidTopic):
        routes.learn("a.#")
    assert "a.#" not in routes.known
    for key in ("c", "d", "e"):
        routes.learn(key)
    # Bounded: full, it starts over rather than grow.
    assert len(routes.known) <= 3 and routes.known["e"] == ("e", exchange_and_key("amq.topic", "e"))


def test_publish_routes_apply_the_topic_length_limit() -> None:
    routes = PublishRoutes(5)
    assert routes.learn("a.b.c")[0] == "a/b/c"
    with pytest.raises(InvalidTopic):
        routes.learn("a.b.cd")


@pytest.mark.parametrize(("key", "topic_filter"), [
    ("a.*.c", "a/+/c"),
    ("a.#", "a/#"),
    ("#", "#"),
    ("*", "+"),
    ("x/y.*", "x.y/+"),
    ("a*b.c", "a*b/c"),  # '*' inside a word is a literal on both sides
])
def test_binding_keys_become_filters(key: str, topic_filter: str) -> None:
    assert binding_key_to_filter(key, 1024) == topic_filter


@pytest.mark.parametrize("key", ["#.a", "a.#.b", "a.+", "a.b#", "a+.b", ""])
def test_binding_keys_mqtt_cannot_say_are_refused(key: str) -> None:
    with pytest.raises(InvalidTopic):
        binding_key_to_filter(key, 1024)


# -- SASL ------------------------------------------------------------------------------------------------


def test_plain_response() -> None:
    user, secret = parse_response("PLAIN", "\x00alice\x00s3cret")
    assert (user, secret.reveal()) == ("alice", b"s3cret")
    user, secret = parse_response("PLAIN", b"alice\x00alice\x00\xff\xfe")
    assert (user, secret.reveal()) == ("alice", b"\xff\xfe")
    assert "s3cret" not in repr(secret)


@pytest.mark.parametrize(("mechanism", "response"), [
    ("PLAIN", "alice:s3cret"),
    ("PLAIN", "\x00a\x00b\x00c"),
    ("PLAIN", "admin\x00alice\x00pw"),  # acting as someone else
    ("PLAIN", b"\x00\xff\x00pw"),
    ("AMQPLAIN", b"\x05LOGIN"),
    ("AMQPLAIN", encode.field_table({"LOGIN": "a"})[4:]),
    ("EXTERNAL", ""),
])
def test_bad_responses_are_refused_without_echoing_the_secret(mechanism: str, response: str | bytes) -> None:
    with pytest.raises(SASLError) as info:
        parse_response(mechanism, response)
    assert "pw" not in str(info.value)


def test_amqplain_response() -> None:
    raw = encode.field_table({"LOGIN": "bob", "PASSWORD": "hunter2"})[4:]
    user, secret = parse_response("AMQPLAIN", raw)
    assert (user, secret.reveal()) == ("bob", b"hunter2")


# -- queues and channels ------------------------------------------------------------------------------------


class FakeOutput:
    """A connection that records what a channel writes."""

    frame_max = 131072
    consumer_cancel_notify = True

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = True
        self.pending: list[Channel] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def can_send(self) -> bool:
        return self.open

    def confirm_pending(self, channel: Channel) -> None:
        self.pending.append(channel)


def make_broker(max_queued: int = 10, check_owners: bool = True) -> tuple[Broker, Router, Metrics]:
    router = Router()
    metrics = Metrics()
    return Broker(router=router, metrics=metrics, max_queued=max_queued, check_owners=check_owners), router, metrics


def declare(broker: Broker, name: str, identity: Identity = ALICE, connection: object = "conn-a", **flags: bool):  # type: ignore[no-untyped-def]
    options = {"passive": False, "durable": False, "exclusive": False, "auto_delete": False, **flags}
    return broker.declare(name, identity=identity, connection=connection, **options)


def test_owner_and_exclusive_rules() -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q")
    assert declare(broker, "q") is queue
    with pytest.raises(ChannelError) as info:
        declare(broker, "q", identity=BOB)
    assert info.value.reply_code == ACCESS_REFUSED
    assert broker.find("q", ROOT, "conn-r") is queue
    locked = declare(broker, "", exclusive=True)
    assert locked.name.startswith("amq.gen-")
    with pytest.raises(ChannelError) as info:
        broker.find(locked.name, ALICE, "conn-b")
    assert info.value.reply_code == RESOURCE_LOCKED
    broker.find(locked.name, ALICE, "conn-b", publish=True)
    with pytest.raises(ChannelError) as info:
        broker.find("missing", ALICE, "conn-a")
    assert info.value.reply_code == NOT_FOUND
    with pytest.raises(ChannelError) as info:
        declare(broker, "amq.mine")
    assert info.value.reply_code == ACCESS_REFUSED
    with pytest.raises(ChannelError) as info:
        declare(broker, "bad\nname")
    assert info.value.reply_code == PRECONDITION_FAILED
    broker.connection_closed("conn-a", [locked])
    assert locked.name not in broker.queues


def test_owners_are_not_checked_when_auth_is_off() -> None:
    broker, _, _ = make_broker(check_owners=False)
    queue = declare(broker, "q")
    assert broker.find("q", BOB, "conn-b") is queue


def test_a_full_queue_drops_and_counts() -> None:
    broker, _, metrics = make_broker(max_queued=3)
    queue = declare(broker, "q")
    results = [queue.put(Message("q", bytes([i]))) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert sum(metrics.messages_dropped.values()) == 2


def test_router_messages_reach_a_bound_queue_with_amqp_envelopes() -> None:
    broker, router, _ = make_broker()
    queue = declare(broker, "q")
    broker.bind(queue, "a/+/c")
    router.publish(Message("a/b/c", b"mqtt", 1))
    amqp = AMQPMessage("a/x/c", b"amqp", 0, exchange_key=exchange_and_key("amq.topic", "a.x.c"),
                       properties=b"\x80\x00\x04text")
    assert dataclasses.replace(amqp, retain=True).topic == "a/x/c"
    router.publish(amqp)
    (first, redelivered), (second, _) = queue.ready
    assert not redelivered
    assert envelope(first) == (exchange_and_key("amq.topic", "a.b.c"), PROPERTIES_PERSISTENT)
    assert envelope(Message("t", b"", 0)) == (exchange_and_key("amq.topic", "t"), PROPERTIES_NONE)
    assert envelope(second) == (amqp.exchange_key, b"\x80\x00\x04text")
    broker.unbind(queue, "a/+/c")
    router.publish(Message("a/b/c", b"late", 1))
    assert len(queue.ready) == 2


def test_prefetch_acks_and_requeue_in_order() -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q")
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.prefetch_count = 2
    for i in range(5):
        queue.put(Message("q", bytes([i])))
    consumer = channel.consume(queue, "c1", no_ack=False, exclusive=False)
    assert list(channel.unacked) == [1, 2] and len(queue.ready) == 3
    channel.ack(1, False)
    assert list(channel.unacked) == [2, 3] and consumer.unacked == 2
    # 1 and 2 go back to the front in order and are delivered again at once, redelivered.
    channel.nack(3, True, True)
    assert [(tag, entry[1].payload) for tag, entry in channel.unacked.items()] == [(4, b"\x01"), (5, b"\x02")]
    assert [m.payload for m, _ in queue.ready] == [b"\x03", b"\x04"]
    redelivered_flags = [frame[7 + 4 + 1 + len("c1") + 8] for frame in output.frames]
    assert redelivered_flags == [0, 0, 0, 1, 1]
    with pytest.raises(ChannelError) as info:
        channel.ack(99, False)
    assert info.value.reply_code == PRECONDITION_FAILED
    channel.shutdown()
    assert not channel.unacked and not queue.consumers
    assert [m.payload for m, _ in queue.ready] == [bytes([i]) for i in range(1, 5)]
    assert all(redelivered for _, redelivered in list(queue.ready)[:2])


def test_consumers_share_a_queue_round_robin() -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q")
    first_out, second_out = FakeOutput(), FakeOutput()
    first = Channel(1, first_out, broker, Metrics())
    second = Channel(1, second_out, broker, Metrics())
    first.consume(queue, "a", no_ack=True, exclusive=False)
    second.consume(queue, "b", no_ack=True, exclusive=False)
    for i in range(4):
        queue.put(Message("q", bytes([i])))
    assert len(first_out.frames) == len(second_out.frames) == 2


def test_a_consumer_that_cannot_send_leaves_messages_queued() -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q")
    output = FakeOutput()
    output.open = False
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=True, exclusive=False)
    queue.put(Message("q", b"x"))
    assert not output.frames and len(queue.ready) == 1
    output.open = True
    channel.refill()
    assert len(output.frames) == 1 and not queue.ready


def test_confirms_coalesce_into_one_ack() -> None:
    broker, _, _ = make_broker()
    output = FakeOutput()
    channel = Channel(3, output, broker, Metrics())
    channel.confirm = True
    for _ in range(5):
        channel.publish_seq += 1
        channel.confirmed()
    frames = channel.confirm_frames()
    assert frames[-10:-1] == (5).to_bytes(8, "big") + b"\x01"  # delivery tag 5, multiple
    assert channel.confirm_frames() == b""
    channel.publish_seq += 1
    channel.confirmed()
    assert channel.confirm_frames()[-10:-1] == (6).to_bytes(8, "big") + b"\x00"


def test_all_queues_together_are_bounded_in_bytes() -> None:
    broker, _, metrics = make_broker(max_queued=100)
    broker.max_queued_bytes = 10
    first, second = declare(broker, "q1"), declare(broker, "q2")
    assert first.put(Message("q1", b"123456"))
    assert not second.put(Message("q2", b"12345"))
    assert second.put(Message("q2", b"1234"))
    assert broker.queued_bytes == 10
    assert first.pop() is not None and broker.queued_bytes == 4
    assert second.purge() == 1 and broker.queued_bytes == 0
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    first.put(Message("q1", b"abc"))
    channel.consume(first, "c", no_ack=False, exclusive=False)
    assert broker.queued_bytes == 0  # delivered, now unacknowledged on the channel
    channel.shutdown()
    assert broker.queued_bytes == 3  # requeued
    broker.delete(first)
    assert broker.queued_bytes == 0
    assert metrics.messages_dropped[(Protocol.AMQP091, "memory_limit")] == 1


def test_a_free_consumer_gets_messages_at_once_and_a_busy_one_in_order() -> None:
    broker, _, _ = make_broker()
    broker.max_queued_bytes = 4
    queue = declare(broker, "q")
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.prefetch_count = 1
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    # Straight to the consumer: nothing waits in the queue, so the byte budget is not touched.
    assert queue.put(Message("q", b"first"))
    assert len(output.frames) == 1 and not queue.ready and broker.queued_bytes == 0
    # The consumer is at its prefetch: later messages wait their turn behind each other.
    assert queue.put(Message("q", b"2"))
    assert queue.put(Message("q", b"3"))
    assert [m.payload for m, _ in queue.ready] == [b"2", b"3"]
    channel.ack(1, False)
    channel.ack(2, False)
    channel.ack(3, False)
    assert [frame[-2:-1] for frame in output.frames[1:]] == [b"2", b"3"]
    assert not queue.ready and broker.queued_bytes == 0
