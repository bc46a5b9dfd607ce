"""AMQP 0.9.1 topic mapping, SASL responses, and queue/channel bookkeeping without sockets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st
from pamqp import commands, encode, frame as pamqp_frame

from gateway.amqp091.broker import KEY_PREFIX, REDELIVERED, AMQPMessage, Broker, Queue, envelope, queue_limits
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
from gateway.queues import BLOCK, DROP_OLDEST, REFUSED, REJECT_NEW, STORED, MemoryBudget, QueueLimits
from gateway.router import ROUTED, Message, Router
from gateway.store.base import Store, StoredQueue
from tests.unit.store_doubles import RecordingStore
from tests.unit.publisher_doubles import FakePublisher

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
        self.publisher = FakePublisher()

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def can_send(self) -> bool:
        return self.open

    def confirm_pending(self, channel: Channel) -> None:
        self.pending.append(channel)


def make_broker(max_queued: int = 10, check_owners: bool = True, *, max_bytes: int = 10**9,
                overflow: str = REJECT_NEW, store: Store | None = None,
                budget: MemoryBudget | None = None) -> tuple[Broker, Router, Metrics]:
    router = Router(budget=budget)
    metrics = Metrics()
    limits = QueueLimits(max_queued, max_bytes, overflow)
    return Broker(router=router, metrics=metrics, limits=limits, check_owners=check_owners, store=store), router, metrics


def declare(broker: Broker, name: str, identity: Identity = ALICE, connection: object = "conn-a",
            arguments: dict[str, object] | None = None, **flags: bool) -> Queue:
    options = {"passive": False, "durable": False, "exclusive": False, "auto_delete": False, **flags}
    return broker.declare(name, identity=identity, connection=connection, arguments=arguments, **options)


def ready(queue: Queue) -> list[bytes]:
    return [message.payload for message, _, _ in queue.ready.entries]


def unmarshal_all(data: bytes) -> list[object]:
    frames: list[object] = []
    while data:
        used, _channel, value = pamqp_frame.unmarshal(data)
        frames.append(value)
        data = data[used:]
    return frames


def confirms(data: bytes) -> list[tuple[str, int, bool]]:
    """basic.ack / basic.nack frames as (name, delivery tag, multiple)."""
    return [(type(f).__name__, f.delivery_tag, f.multiple) for f in unmarshal_all(data)]  # type: ignore[attr-defined]


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


def test_a_full_queue_refuses_and_counts() -> None:
    broker, _, metrics = make_broker(max_queued=3)
    queue = declare(broker, "q")
    publisher = FakePublisher(refusable=True)
    results = [queue.put(Message("q", bytes([i])), publisher) for i in range(5)]
    assert results == [0, 0, 0, REFUSED, REFUSED]
    assert ready(queue) == [b"\x00", b"\x01", b"\x02"]
    assert metrics.messages_dropped[(Protocol.AMQP091, "queue_full")] == 2
    assert metrics.overflows[(Protocol.AMQP091, REJECT_NEW)] == 2
    # Nobody to tell (a retained replay, a will): the refusal is a drop, no status.
    assert queue.put(Message("q", b"x")) == 0
    assert metrics.messages_dropped[(Protocol.AMQP091, "queue_full")] == 3


def test_router_messages_reach_a_bound_queue_with_amqp_envelopes() -> None:
    broker, router, _ = make_broker()
    queue = declare(broker, "q")
    broker.bind(queue, "a/+/c")
    assert queue.bindings == {"a/+/c": ()}
    assert router.publish(Message("a/b/c", b"mqtt", 1)) == ROUTED
    amqp = AMQPMessage("a/x/c", b"amqp", 0, exchange_key=exchange_and_key("amq.topic", "a.x.c"),
                       properties=b"\x80\x00\x04text")
    assert dataclasses.replace(amqp, retain=True).topic == "a/x/c"
    router.publish(amqp)
    (first, meta, seq), (second, _, _) = queue.ready.entries
    assert not meta & REDELIVERED and seq == 0
    assert envelope(first) == (exchange_and_key("amq.topic", "a.b.c"), PROPERTIES_PERSISTENT)
    assert envelope(Message("t", b"", 0)) == (exchange_and_key("amq.topic", "t"), PROPERTIES_NONE)
    assert envelope(second) == (amqp.exchange_key, b"\x80\x00\x04text")
    broker.unbind(queue, "a/+/c")
    router.publish(Message("a/b/c", b"late", 1))
    assert len(queue.ready) == 2


def test_a_binding_with_exclusions_skips_excluded_topics_and_retained_messages() -> None:
    broker, router, _ = make_broker()
    router.publish(Message("a/secret", b"r1", 1, True))
    router.publish(Message("a/open", b"r2", 1, True))
    queue = declare(broker, "q")
    broker.bind(queue, "a/#", ("a/secret",))
    assert ready(queue) == [b"r2"]  # retained messages go in first, minus the excluded one
    router.publish(Message("a/secret", b"x", 1))
    router.publish(Message("a/open", b"y", 1))
    assert ready(queue) == [b"r2", b"y"]


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
    assert ready(queue) == [b"\x03", b"\x04"]
    redelivered_flags = [frame[7 + 4 + 1 + len("c1") + 8] for frame in output.frames]
    assert redelivered_flags == [0, 0, 0, 1, 1]
    with pytest.raises(ChannelError) as info:
        channel.ack(99, False)
    assert info.value.reply_code == PRECONDITION_FAILED
    channel.shutdown()
    assert not channel.unacked and not queue.consumers
    assert ready(queue) == [bytes([i]) for i in range(1, 5)]
    assert [bool(meta & REDELIVERED) for _, meta, _ in queue.ready.entries] == [True, True, False, False]


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
        channel.confirmed(channel.publish_seq)
    assert output.pending == [channel] * 5
    frames = channel.confirm_frames()
    assert frames[-10:-1] == (5).to_bytes(8, "big") + b"\x01"  # delivery tag 5, multiple
    assert confirms(frames) == [("Ack", 5, True)]
    assert channel.confirm_frames() == b""
    channel.publish_seq += 1
    channel.confirmed(channel.publish_seq)
    assert channel.confirm_frames()[-10:-1] == (6).to_bytes(8, "big") + b"\x00"


@pytest.mark.parametrize(("outcomes", "expected"), [
    ([False], [("Nack", 1, False)]),
    ([True, False, True], [("Ack", 1, False), ("Nack", 2, False), ("Ack", 3, False)]),
    ([True, True, True, False, False, True, True],
     [("Ack", 3, True), ("Nack", 4, False), ("Nack", 5, False), ("Ack", 7, True)]),
    ([False, True, True], [("Nack", 1, False), ("Ack", 3, True)]),
    ([True, True, False], [("Ack", 2, True), ("Nack", 3, False)]),
])
def test_confirms_ack_runs_and_nack_refused_publishes_in_order(outcomes: list[bool],
                                                                expected: list[tuple[str, int, bool]]) -> None:
    broker, _, _ = make_broker()
    channel = Channel(1, FakeOutput(), broker, Metrics())
    channel.confirm = True
    for seq, ok in enumerate(outcomes, start=1):
        channel.confirmed(seq, ok)
    assert confirms(channel.confirm_frames()) == expected
    assert channel.confirm_frames() == b"" and channel.nacked == []


@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=6), min_size=1, max_size=5))
def test_confirm_frames_confirm_every_publish_exactly_once(flushes: list[list[bool]]) -> None:
    broker, _, _ = make_broker()
    channel = Channel(1, FakeOutput(), broker, Metrics())
    channel.confirm = True
    seq = 0
    outcome: dict[int, str] = {}
    for flush in flushes:
        for ok in flush:
            seq += 1
            channel.confirmed(seq, ok)
        for name, tag, multiple in confirms(channel.confirm_frames()):
            tags = [t for t in range(1, tag + 1) if t not in outcome] if multiple else [tag]
            assert tags and all(t not in outcome for t in tags)
            for t in tags:
                outcome[t] = name
    assert outcome == {n: "Ack" if ok else "Nack" for n, ok in enumerate((ok for f in flushes for ok in f), start=1)}


def test_queues_count_against_the_memory_budget() -> None:
    budget = MemoryBudget(10**9)
    broker, _, _ = make_broker(budget=budget)
    assert broker.budget is budget
    first, second = declare(broker, "q1"), declare(broker, "q2")
    first.put(Message("q1", b"123456"))
    second.put(Message("q2", b"1234"))
    assert budget.messages == 2 and budget.used > 10
    assert first.pop() is not None and budget.messages == 1
    assert second.purge() == 1 and budget.used == 0 and budget.messages == 0
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    first.put(Message("q1", b"abc"))
    channel.consume(first, "c", no_ack=False, exclusive=False)
    assert budget.used == 0  # delivered, now unacknowledged on the channel
    channel.shutdown()
    assert budget.messages == 1  # requeued
    assert broker.delete(first) == 1
    assert budget.used == 0 and budget.messages == 0


def test_the_memory_alarm_reaches_the_broker_listeners() -> None:
    budget = MemoryBudget(1000)
    broker, _, _ = make_broker(budget=budget, max_bytes=10**6, max_queued=100)
    heard: list[bool] = []
    broker.alarm_listeners.add(heard.append)
    queue = declare(broker, "q")
    queue.put(Message("q", b"x" * 900))
    assert heard == [True]
    queue.pop()
    assert heard == [True, False]


def test_a_free_consumer_gets_messages_at_once_and_a_busy_one_in_order() -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q")
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.prefetch_count = 1
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    # Straight to the consumer: nothing waits in the queue, so the budget is not touched.
    assert queue.put(Message("q", b"first")) == 0
    assert len(output.frames) == 1 and not queue.ready and broker.budget.used == 0
    # The consumer is at its prefetch: later messages wait their turn behind each other.
    queue.put(Message("q", b"2"))
    queue.put(Message("q", b"3"))
    assert ready(queue) == [b"2", b"3"]
    channel.ack(1, False)
    channel.ack(2, False)
    channel.ack(3, False)
    assert [frame[-2:-1] for frame in output.frames[1:]] == [b"2", b"3"]
    assert not queue.ready and broker.budget.used == 0


# -- queue arguments --------------------------------------------------------------------------------------


def test_queue_arguments_set_the_bound_and_the_policy() -> None:
    broker, _, metrics = make_broker(max_queued=100)
    queue = declare(broker, "q", arguments={"x-max-length": 2, "x-overflow": "drop-head", "x-other": 1})
    assert queue.ready.limits == QueueLimits(2, 10**9, DROP_OLDEST)
    assert queue.arguments == {"x-max-length": 2, "x-overflow": "drop-head"}  # only what the gateway acts on
    for i in range(4):
        queue.put(Message("q", bytes([i])))
    assert ready(queue) == [b"\x02", b"\x03"]
    assert metrics.overflows[(Protocol.AMQP091, DROP_OLDEST)] == 2
    by_bytes = declare(broker, "b", arguments={"x-max-length-bytes": 4, "x-overflow": b"reject-publish"})
    assert by_bytes.ready.limits == QueueLimits(100, 4, REJECT_NEW)
    publisher = FakePublisher()
    assert by_bytes.put(Message("b", b"123"), publisher) == 0
    assert by_bytes.put(Message("b", b"12"), publisher) == REFUSED
    assert by_bytes.put(Message("b", b"1"), publisher) == 0
    assert declare(broker, "z", arguments={"x-max-length": 0}).ready.limits.max_messages == 1


@pytest.mark.parametrize(("overflow", "policy"), [
    ("reject-publish", REJECT_NEW), ("reject-publish-dlx", REJECT_NEW), ("drop-head", DROP_OLDEST), ("block", BLOCK),
])
def test_x_overflow_values(overflow: str, policy: str) -> None:
    assert queue_limits(QueueLimits(5, 6, DROP_OLDEST), {"x-overflow": overflow}) == QueueLimits(5, 6, policy)


@pytest.mark.parametrize("arguments", [
    {"x-max-length": -1},
    {"x-max-length": "10"},
    {"x-max-length": True},
    {"x-max-length": 1.5},
    {"x-max-length-bytes": -5},
    {"x-overflow": "drop-tail"},
    {"x-overflow": ""},
])
def test_bad_queue_arguments_are_refused_with_406(arguments: dict[str, object]) -> None:
    broker, _, _ = make_broker()
    with pytest.raises(ChannelError) as info:
        declare(broker, "q", arguments=arguments)
    assert info.value.reply_code == PRECONDITION_FAILED
    assert "q" not in broker.queues


@pytest.mark.parametrize(("first", "second"), [
    ({"x-max-length": 5}, {"x-max-length": 6}),
    ({"x-max-length": 5}, {}),
    ({}, {"x-overflow": "drop-head"}),
    ({"x-overflow": "drop-head"}, {"x-overflow": "reject-publish"}),
    ({"x-max-length-bytes": 10}, {"x-max-length-bytes": 11}),
])
def test_an_inequivalent_redeclare_is_refused_with_406(first: dict[str, object], second: dict[str, object]) -> None:
    broker, _, _ = make_broker()
    queue = declare(broker, "q", arguments=first)
    with pytest.raises(ChannelError) as info:
        declare(broker, "q", arguments=second)
    assert info.value.reply_code == PRECONDITION_FAILED
    assert "inequivalent arg" in info.value.reply_text
    assert declare(broker, "q", arguments=dict(first)) is queue
    # A passive declare checks nothing but existence and access.
    assert declare(broker, "q", arguments=second, passive=True) is queue


def test_an_inequivalent_flag_is_refused_with_406() -> None:
    broker, _, _ = make_broker()
    declare(broker, "q", durable=False)
    with pytest.raises(ChannelError) as info:
        declare(broker, "q", durable=True)
    assert info.value.reply_code == PRECONDITION_FAILED


async def test_a_block_queue_holds_other_publishers_but_not_its_consumers_connection() -> None:
    broker, _, _ = make_broker(max_queued=2, overflow=BLOCK)
    queue = declare(broker, "q")
    output = FakeOutput()
    output.open = False
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=True, exclusive=False)
    other = FakePublisher()
    for i in range(3):
        queue.put(Message("q", bytes([i])), other)
    assert other.gate.held and len(queue.ready) == 3
    queue.put(Message("q", b"own"), output.publisher)
    assert not output.publisher.gate.held
    output.open = True
    channel.refill()
    assert not queue.ready and not other.gate.held


# -- durable queues and the store ------------------------------------------------------------------------------


def test_a_durable_queue_writes_persistent_messages_until_acknowledged() -> None:
    store = RecordingStore()
    broker, router, _ = make_broker(store=store)
    queue = declare(broker, "dq", durable=True)
    key = KEY_PREFIX + "dq"
    assert queue.kept
    assert store.queues[key]["name"] == "dq" and store.queues[key]["owner"] == "alice"
    broker.bind(queue, "t/#")
    assert store.queues[key]["bindings"] == [["t/#", []]]
    assert router.publish(Message("t/1", b"persistent", 1)) == ROUTED | STORED
    assert router.publish(Message("t/2", b"transient", 0)) == ROUTED  # in memory only
    assert store.payloads(key) == [b"persistent"]
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    # Unacked entries carry the store seq.
    assert [(entry[1].payload, entry[3]) for entry in channel.unacked.values()] == [(b"persistent", 1), (b"transient", 0)]
    channel.nack(1, False, True)  # requeued: the row stays
    assert store.payloads(key) == [b"persistent"]
    (tag, entry), = [(t, e) for t, e in channel.unacked.items() if e[1].payload == b"persistent"]
    assert entry[3] == 1
    channel.ack(tag, False)
    assert store.payloads(key) == []
    # Straight to a free consumer: written with persist, removed on ack.
    assert queue.put(Message("t/3", b"direct", 1)) == STORED
    (tag, entry), = [(t, e) for t, e in channel.unacked.items() if e[1].payload == b"direct"]
    assert store.payloads(key) == [b"direct"]
    channel.nack(tag, False, False)  # rejected without requeue: gone
    assert store.payloads(key) == []


def test_a_no_ack_consumer_and_basic_get_settle_at_once() -> None:
    store = RecordingStore()
    broker, _, _ = make_broker(store=store)
    queue = declare(broker, "dq", durable=True)
    key = KEY_PREFIX + "dq"
    for i in range(3):
        queue.put(Message("dq", bytes([i]), 1))
    assert store.payloads(key) == [b"\x00", b"\x01", b"\x02"]
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.get(queue, no_ack=True)
    assert store.payloads(key) == [b"\x01", b"\x02"]
    channel.get(queue, no_ack=False)
    assert store.payloads(key) == [b"\x01", b"\x02"]
    channel.ack(2, False)
    assert store.payloads(key) == [b"\x02"]
    channel.consume(queue, "c", no_ack=True, exclusive=False)
    assert store.payloads(key) == []


def test_exclusive_and_transient_queues_are_not_kept() -> None:
    store = RecordingStore()
    broker, _, _ = make_broker(store=store)
    for queue in (declare(broker, "t"), declare(broker, "x", durable=True, exclusive=True)):
        assert not queue.kept
        queue.put(Message("q", b"x", 1))
    assert store.calls == []


def test_deleting_a_durable_queue_deletes_it_from_the_store() -> None:
    store = RecordingStore()
    broker, _, _ = make_broker(store=store)
    queue = declare(broker, "dq", durable=True)
    queue.put(Message("dq", b"x", 1))
    assert broker.delete(queue) == 1
    assert store.ops("delete_queue") == [("delete_queue", KEY_PREFIX + "dq")]
    assert store.queues == {} and store.rows == {}


def test_purge_of_a_durable_queue_removes_its_rows() -> None:
    store = RecordingStore()
    broker, _, _ = make_broker(store=store)
    queue = declare(broker, "dq", durable=True)
    for i in range(3):
        queue.put(Message("dq", bytes([i]), 1))
    assert queue.purge() == 3
    assert store.payloads(KEY_PREFIX + "dq") == [] and KEY_PREFIX + "dq" in store.queues


def test_restore_brings_back_queues_with_bindings_arguments_and_messages() -> None:
    store = RecordingStore()
    broker, router, _ = make_broker(store=store)
    kept = StoredQueue(
        key=KEY_PREFIX + "dq",
        meta={"kind": "amqp091", "name": "dq", "owner": "alice", "auto_delete": False,
              "arguments": {"x-max-length": 3, "x-overflow": "drop-head"}, "bindings": [["a/#", ["a/secret"]]]},
        head=[(4, AMQPMessage("a/b", b"kept", 1, exchange_key=exchange_and_key("amq.topic", "orig.key"),
                              properties=PROPERTIES_PERSISTENT), 0)],
        count=1, last_seq=4,
    )
    broker.restore([kept])
    queue = broker.queues["dq"]
    assert queue.kept and queue.owner == "alice" and queue.bindings == {"a/#": ("a/secret",)}
    assert queue.ready.limits == QueueLimits(3, 10**9, DROP_OLDEST)
    assert ready(queue) == [b"kept"]
    with pytest.raises(ChannelError):
        declare(broker, "dq", identity=BOB, durable=True)
    router.publish(Message("a/secret", b"no", 1))
    router.publish(Message("a/c", b"new", 1))
    assert ready(queue) == [b"kept", b"new"]
    assert store.ops("add") == [("add", KEY_PREFIX + "dq", 5, b"new", 0)]
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    deliver, header, body = unmarshal_all(output.frames[0])
    assert isinstance(deliver, commands.Basic.Deliver)
    # The restored AMQP message keeps its own exchange and routing key.
    assert (deliver.exchange, deliver.routing_key, deliver.redelivered) == ("amq.topic", "orig.key", False)
    assert body.value == b"kept"  # type: ignore[attr-defined]
    channel.ack(0, True)
    assert [call[2] for call in store.ops("remove")] == [4, 5]


def test_a_connection_publishing_into_a_full_queue_it_consumes_from_is_refused() -> None:
    """It is never held by a queue it consumes from (its acks drain it), but still told: a basic.nack."""
    broker, _, metrics = make_broker(max_queued=1)
    queue = declare(broker, "q")
    output = FakeOutput()
    output.open = False  # its consumer cannot take more right now
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    assert queue.put(Message("q", b"1"), output.publisher) == 0
    assert queue.put(Message("q", b"3"), FakePublisher()) == REFUSED  # any other publisher is told
    assert queue.put(Message("q", b"2"), output.publisher) == REFUSED
    assert not output.publisher.gate.held
    assert ready(queue) == [b"1"]
    assert metrics.messages_dropped[(Protocol.AMQP091, "queue_full")] == 2


async def test_a_connection_without_confirms_publishing_into_a_full_queue_it_consumes_from_is_not_held() -> None:
    """Without confirms it cannot be told: its message is taken over the bound, and it is not held."""
    broker, _, metrics = make_broker(max_queued=1)
    queue = declare(broker, "q")
    output = FakeOutput()
    output.open = False
    output.publisher.refusable = False
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    assert queue.put(Message("q", b"1"), output.publisher) == 0
    assert queue.put(Message("q", b"2"), output.publisher) == 0
    assert not output.publisher.gate.held
    assert ready(queue) == [b"1", b"2"] and metrics.messages_dropped == {}
    other = FakePublisher(refusable=False)
    assert queue.put(Message("q", b"3"), other) == 0
    assert other.gate.held  # another connection's publisher is held as before


def test_a_durable_queue_out_of_sequence_numbers_does_not_report_an_unwritten_message_stored() -> None:
    store = RecordingStore(max_seq=1)
    broker, _, _ = make_broker(store=store)
    queue = declare(broker, "dq", durable=True)
    output = FakeOutput()
    channel = Channel(1, output, broker, Metrics())
    channel.consume(queue, "c", no_ack=False, exclusive=False)
    publisher = FakePublisher(refusable=True)
    assert queue.put(Message("dq", b"1", 1), publisher) == STORED  # seq 1, delivered, not acknowledged
    status = queue.put(Message("dq", b"2", 1), publisher)  # no number left
    written = b"2" in store.payloads(KEY_PREFIX + "dq")
    assert written or status == REFUSED, f"status {status}: neither written nor refused"
