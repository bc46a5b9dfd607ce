"""The local router: matching rules, delivery qos, subscriptions, retained messages, the match cache."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from gateway import router as router_module
from gateway.backpressure import NO_PUBLISHER, Blocker, Publisher
from gateway.errors import InvalidTopic
from gateway.queues import MemoryBudget
from gateway.router import REFUSED, ROUTED, STORED, Message, Router
from gateway.store.memory import MemoryStore
from tests.unit.store_doubles import RecordingStore


class Recorder:
    """Records (topic, payload, qos, retain) per delivery; `status` is what its deliver returns."""

    def __init__(self, status: int = 0) -> None:
        self.received: list[tuple[str, bytes, int, bool]] = []
        self.publishers: list[Publisher] = []
        self.status = status

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        self.received.append((message.topic, message.payload, qos, retain))
        self.publishers.append(publisher)
        return self.status

    def topics(self) -> list[str]:
        return [topic for topic, _, _, _ in self.received]


class EqualToEverything(Recorder):
    """A subscriber whose __eq__/__hash__ would merge distinct objects if the router relied on them."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return 1


class Raising:
    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        self.calls += 1
        raise RuntimeError("queue exploded")


def trie_size(router: Router) -> int:
    """Nodes below the root of the subscription trie."""
    stack = list(router._root.children.values())
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.children.values())
    return count


def retained_trie_size(router: Router) -> int:
    stack = list(router._retained_root.children.values())
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node.children.values())
    return count


def receives(topic_filter: str, topic: str) -> bool:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, topic_filter, 0)
    status = router.publish(Message(topic, b"x"))
    assert status == (ROUTED if sub.received else 0)
    assert len(sub.received) <= 1
    return bool(sub.received)


# -- matching rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/b", "a", False),
        ("a/+", "a/b", True),
        ("a/+", "a/", True),  # `+` matches an empty level
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("+/+", "/x", True),
        ("+", "/", False),
        ("+/b/+", "x/b/y", True),
        ("a/#", "a", True),  # parent level
        ("a/#", "a/b/c/d", True),
        ("a/#", "ab", False),
        ("a/#", "b/a", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("+/#", "a", True),
        ("a/+/#", "a", False),
        ("a/+/#", "a/b", True),
        ("#", "$SYS/x", False),  # MQTT-4.7.2-1
        ("+/x", "$SYS/x", False),
        ("+", "$SYS", False),
        ("$SYS/#", "$SYS", True),
        ("$SYS/#", "$SYS/broker/load", True),
        ("$SYS/+", "$SYS/x", True),
        ("a/+", "a/$x", True),  # only the first level is special
        ("a/#", "a/$x/y", True),
    ],
)
def test_matching_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert receives(topic_filter, topic) is expected


def test_forwarded_messages_have_retain_false_and_are_the_published_object() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a", 1)
    message = Message("a", b"p", 1, True)
    assert router.publish(message) == ROUTED
    assert sub.received == [("a", b"p", 1, False)]  # MQTT-3.3.1-9


# -- delivery qos ------------------------------------------------------------


@pytest.mark.parametrize(("publish_qos", "expected"), [(0, 0), (1, 1), (2, 2)])
def test_overlapping_filters_deliver_once_at_highest_granted_qos_capped_by_publish(
    publish_qos: int, expected: int
) -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/b", 1)
    router.subscribe(sub, "a/+", 2)
    router.subscribe(sub, "#", 0)
    router.subscribe(sub, "a/#", 1)
    assert router.publish(Message("a/b", b"x", publish_qos)) == ROUTED
    assert sub.received == [("a/b", b"x", expected, False)]


def test_granted_qos_caps_publish_qos() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/+", 1)
    router.publish(Message("a/b", b"x", 2))
    assert sub.received == [("a/b", b"x", 1, False)]


def test_only_matching_filters_count_for_qos() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/b", 0)
    router.subscribe(sub, "c/#", 2)
    router.publish(Message("a/b", b"x", 2))
    assert sub.received == [("a/b", b"x", 0, False)]


def test_each_subscriber_gets_its_own_qos() -> None:
    router = Router()
    low, high, other = Recorder(), Recorder(), Recorder()
    router.subscribe(low, "t", 0)
    router.subscribe(high, "+", 2)
    router.subscribe(other, "u", 2)
    assert router.publish(Message("t", b"x", 2)) == ROUTED
    assert low.received == [("t", b"x", 0, False)]
    assert high.received == [("t", b"x", 2, False)]
    assert other.received == []


def test_subscribers_are_told_apart_by_identity_not_equality() -> None:
    router = Router()
    first, second = EqualToEverything(), EqualToEverything()
    router.subscribe(first, "a", 1)
    router.subscribe(second, "a", 2)
    assert router.subscription_count == 2
    assert router.publish(Message("a", b"x", 2)) == ROUTED
    assert first.received == [("a", b"x", 1, False)]
    assert second.received == [("a", b"x", 2, False)]
    assert router.unsubscribe(first, "a") is True
    assert router.subscriptions(second) == {"a": 2}


def test_unhashable_subscribers_are_accepted() -> None:
    @dataclasses.dataclass
    class ValueSubscriber:  # eq=True makes instances unhashable
        received: list[int] = dataclasses.field(default_factory=list)

        def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
            self.received.append(qos)
            return 0

    router = Router()
    first, second = ValueSubscriber(), ValueSubscriber()
    router.subscribe(first, "a", 1)
    router.subscribe(second, "a", 0)
    router.publish(Message("a", b"x", 1))
    assert (first.received, second.received) == ([1], [0])
    router.unsubscribe_all(first)
    assert router.subscriptions(first) == {}
    assert router.subscriptions(second) == {"a": 0}


# -- subscriptions -----------------------------------------------------------


def test_resubscribe_replaces_qos() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/+", 2)
    router.subscribe(sub, "a/+", 0)  # MQTT-3.8.4-3
    assert router.subscriptions(sub) == {"a/+": 0}
    assert router.subscription_count == 1
    router.publish(Message("a/b", b"x", 2))
    assert sub.received == [("a/b", b"x", 0, False)]


def test_subscriptions_returns_a_copy() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a", 1)
    router.subscriptions(sub)["b"] = 2
    assert router.subscriptions(sub) == {"a": 1}
    assert router.subscriptions(Recorder()) == {}


def test_unsubscribe() -> None:
    router = Router()
    sub, other = Recorder(), Recorder()
    router.subscribe(sub, "a/#", 1)
    router.subscribe(sub, "a/b", 1)
    router.subscribe(other, "a/b", 1)
    assert router.unsubscribe(sub, "a/#") is True
    assert router.unsubscribe(sub, "a/#") is False
    assert router.unsubscribe(sub, "never") is False
    assert router.unsubscribe(Recorder(), "a/b") is False
    assert router.subscriptions(sub) == {"a/b": 1}
    assert router.subscription_count == 2
    router.publish(Message("a/c", b"x"))
    router.publish(Message("a/b", b"y"))
    assert sub.topics() == ["a/b"]
    assert other.topics() == ["a/b"]


def test_unsubscribe_all() -> None:
    router = Router()
    sub, other = Recorder(), Recorder()
    for topic_filter in ("a", "a/+", "#", "$SYS/#"):
        router.subscribe(sub, topic_filter, 1)
    router.subscribe(other, "a", 0)
    router.unsubscribe_all(sub)
    router.unsubscribe_all(sub)  # idempotent
    router.unsubscribe_all(Recorder())
    assert router.subscriptions(sub) == {}
    assert router.subscription_count == 1
    assert router.publish(Message("a", b"x")) == ROUTED
    assert router.publish(Message("$SYS/x", b"x")) == 0
    assert sub.received == []
    assert other.topics() == ["a"]


def test_trie_does_not_grow_over_subscribe_unsubscribe_cycles() -> None:
    router = Router()
    keeper = Recorder()
    router.subscribe(keeper, "a/b", 0)
    baseline = trie_size(router)
    filters = ["a/b/c/d", "a/+/c", "a/#", "x/y/z", "+/+/+/#", "#", "a/b", "/", "$SYS/+"]
    for cycle in range(30):
        subs = [Recorder() for _ in range(3)]
        for sub in subs:
            for topic_filter in filters:
                router.subscribe(sub, topic_filter, cycle % 3)
        router.publish(Message("a/b/c/d", b"x"))
        router.unsubscribe(subs[0], "a/b/c/d")
        for topic_filter in filters:
            router.unsubscribe(subs[1], topic_filter)
        router.unsubscribe_all(subs[0])
        router.unsubscribe_all(subs[2])
        assert trie_size(router) == baseline
        assert router.subscription_count == 1
    assert router._clients.keys() == {id(keeper)}
    router.unsubscribe_all(keeper)
    assert trie_size(router) == 0
    assert router._root.children == {}


def test_subscribe_returns_matching_retained_messages() -> None:
    router = Router()
    router.publish(Message("a/b", b"1", 1, True))
    router.publish(Message("a/c", b"2", 2, True))
    router.publish(Message("b", b"3", 0, True))
    sub = Recorder()
    got = router.subscribe(sub, "a/+", 1)
    assert sorted(got, key=lambda m: m.topic) == [Message("a/b", b"1", 1, True), Message("a/c", b"2", 2, True)]
    assert all(message.retain for message in got)
    assert sub.received == []  # the caller delivers retained messages itself
    # Re-subscribing sends them again (MQTT-3.8.4-3).
    assert len(router.subscribe(sub, "a/+", 2)) == 2


# -- retained messages -------------------------------------------------------


def test_retained_set_replace_clear() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/b", 1)
    assert router.publish(Message("a/b", b"one", 1, True)) == ROUTED
    assert router.retained("a/b") == [Message("a/b", b"one", 1, True)]
    router.publish(Message("a/b", b"two", 0, True))
    assert router.retained("a/b") == [Message("a/b", b"two", 0, True)]
    assert router.retained_count == 1
    # A non-retained publish leaves the retained message alone.
    router.publish(Message("a/b", b"live", 1))
    assert router.retained("a/b") == [Message("a/b", b"two", 0, True)]
    # An empty retained payload clears it and still reaches current subscribers.
    assert router.publish(Message("a/b", b"", 1, True)) == ROUTED
    assert sub.received[-1] == ("a/b", b"", 1, False)
    assert router.retained("a/b") == []
    assert router.retained("#") == []
    assert router.retained_count == 0
    assert retained_trie_size(router) == 0
    # Clearing a topic that holds nothing is harmless.
    router.publish(Message("x/y", b"", 0, True))
    assert router.retained_count == 0


def test_retained_cap_refuses_new_topics_and_keeps_old_ones() -> None:
    router = Router(max_retained=2)
    sub = Recorder()
    router.subscribe(sub, "#", 0)
    router.publish(Message("a", b"1", 0, True))
    router.publish(Message("b", b"2", 0, True))
    assert router.publish(Message("c", b"3", 0, True)) == ROUTED  # still delivered
    assert router.retained_refused == 1
    assert router.retained("c") == []
    assert router.retained_count == 2
    assert retained_trie_size(router) == 2
    # Replacing an existing topic is not a new one.
    router.publish(Message("a", b"1b", 0, True))
    assert router.retained("a") == [Message("a", b"1b", 0, True)]
    assert router.retained_refused == 1
    # Clearing frees a place.
    router.publish(Message("b", b"", 0, True))
    router.publish(Message("c", b"3", 0, True))
    assert sorted(m.topic for m in router.retained("#")) == ["a", "c"]
    assert router.retained_refused == 1


def test_retained_zero_means_no_cap() -> None:
    router = Router(max_retained=0)
    for index in range(500):
        router.publish(Message(f"t/{index}", b"x", 0, True))
    assert router.retained_count == 500
    assert router.retained_refused == 0


def test_negative_retained_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_retained"):
        Router(max_retained=-1)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/b", ["a/b"]),
        ("a/b/c", ["a/b/c"]),
        ("a/c", []),
        ("a/+", ["a/", "a/$x", "a/b"]),
        ("a/#", ["a", "a/", "a/$x", "a/b", "a/b/c"]),
        ("+", ["a", "b"]),
        ("#", ["/", "a", "a/", "a/$x", "a/b", "a/b/c", "b"]),
        ("+/+", ["/", "a/", "a/$x", "a/b"]),
        ("+/b/#", ["a/b", "a/b/c"]),
        ("$SYS/#", ["$SYS", "$SYS/load"]),
        ("$SYS/+", ["$SYS/load"]),
        ("+/load", []),
        ("/", ["/"]),
        ("/+", ["/"]),
    ],
)
def test_retained_lookup_by_filter(topic_filter: str, expected: list[str]) -> None:
    router = Router()
    for topic in ("a", "a/", "a/b", "a/b/c", "a/$x", "b", "/", "$SYS", "$SYS/load"):
        router.publish(Message(topic, topic.encode(), 1, True))
    got = router.retained(topic_filter)
    assert sorted(m.topic for m in got) == expected
    assert all(m.payload == m.topic.encode() and m.retain for m in got)


def test_deep_topics_do_not_hit_the_recursion_limit() -> None:
    router = Router(max_topic_length=0)
    topic = "/".join(["l"] * 3000)
    sub = Recorder()
    router.subscribe(sub, "+/" * 2999 + "+", 1)
    router.subscribe(sub, "l/#", 1)
    router.publish(Message(topic, b"deep", 1, True))
    assert sub.topics() == [topic]
    assert [m.payload for m in router.retained("l/#")] == [b"deep"]
    assert [m.payload for m in router.retained("+/" * 2999 + "+")] == [b"deep"]
    router.publish(Message(topic, b"", 0, True))
    assert retained_trie_size(router) == 0


# -- errors and re-entrancy --------------------------------------------------


def test_a_raising_subscriber_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    before, broken, after = Recorder(), Raising(), Recorder()
    router.subscribe(before, "a", 0)
    router.subscribe(broken, "a", 0)
    router.subscribe(after, "#", 0)
    with caplog.at_level(logging.DEBUG, logger="polygate.router"):
        assert router.publish(Message("a", b"x")) == ROUTED
        assert router.publish(Message("a", b"y")) == ROUTED
    assert before.topics() == ["a", "a"]
    assert after.topics() == ["a", "a"]
    assert broken.calls == 2
    assert router.delivery_errors == 2
    errors = [r for r in caplog.records if r.name == "polygate.router" and r.levelno >= logging.ERROR]
    assert len(errors) == 1  # once per subscriber, not once per message
    assert errors[0].exc_info is not None
    assert "Raising" in errors[0].getMessage()


def test_subscriber_may_change_subscriptions_from_deliver() -> None:
    router = Router()
    later = Recorder()

    class Unsubscriber(Recorder):
        def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
            super().deliver(message, qos, retain, publisher)
            router.unsubscribe_all(self)
            router.subscribe(later, "a", 0)
            return 0

    first = Unsubscriber()
    other = Recorder()
    router.subscribe(first, "a", 0)
    router.subscribe(other, "a", 0)
    assert router.publish(Message("a", b"1")) == ROUTED
    assert router.publish(Message("a", b"2")) == ROUTED
    assert first.topics() == ["a"]
    assert other.topics() == ["a", "a"]
    assert later.topics() == ["a"]


@pytest.mark.parametrize("topic", ["a/+", "a/#", "", "a\x00b", "x" * 1025])
def test_topics_the_frontends_should_have_refused_raise(topic: str) -> None:
    router = Router(max_topic_length=1024)
    sub = Recorder()
    router.subscribe(sub, "#", 0)
    with pytest.raises(InvalidTopic):
        router.publish(Message(topic, b"x", 0, True))
    assert router.retained_count == 0
    assert sub.received == []


# -- the match cache ---------------------------------------------------------


@pytest.mark.parametrize("topic_filter", ["a/b", "a/+", "#", "a/#"])
def test_cache_is_invalidated_by_subscribe(topic_filter: str) -> None:
    router = Router()
    sub = Recorder()
    assert router.publish(Message("a/b", b"1")) == 0
    router.subscribe(sub, topic_filter, 0)
    assert router.publish(Message("a/b", b"2")) == ROUTED
    assert sub.received == [("a/b", b"2", 0, False)]


@pytest.mark.parametrize("topic_filter", ["a/b", "a/+", "#"])
def test_cache_is_invalidated_by_unsubscribe_and_regrant(topic_filter: str) -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, topic_filter, 2)
    router.publish(Message("a/b", b"1", 2))
    router.subscribe(sub, topic_filter, 1)
    router.publish(Message("a/b", b"2", 2))
    router.unsubscribe(sub, topic_filter)
    router.publish(Message("a/b", b"3", 2))
    router.subscribe(sub, topic_filter, 0)
    router.publish(Message("a/b", b"4", 2))
    router.unsubscribe_all(sub)
    router.publish(Message("a/b", b"5", 2))
    assert [(p, q) for _, p, q, _ in sub.received] == [(b"1", 2), (b"2", 1), (b"4", 0)]


def test_literal_subscription_change_keeps_other_cache_entries() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "x/+", 0)
    router.publish(Message("x/1", b""))
    router.publish(Message("x/2", b""))
    router.subscribe(Recorder(), "x/2", 0)
    assert "x/1" in router._match_cache
    assert "x/2" not in router._match_cache


def test_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "MATCH_CACHE_SIZE", 8)
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "t/+", 0)
    for index in range(100):
        assert router.publish(Message(f"t/{index}", b"x")) == ROUTED
        assert len(router._match_cache) <= 8
    assert len(sub.received) == 100


# -- the message type --------------------------------------------------------


def test_message_is_a_frozen_positional_value() -> None:
    message = Message("a", b"p")
    assert (message.qos, message.retain) == (0, False)
    assert Message("a", b"p", 1, True) == Message(topic="a", payload=b"p", qos=1, retain=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.qos = 1  # type: ignore[misc]
    assert not hasattr(message, "__dict__")
    assert dataclasses.replace(message, retain=True) == Message("a", b"p", 0, True)
    assert hash(Message("a", b"p", 1)) == hash(Message("a", b"p", 1))
    assert Message("a", b"p") != Message("a", b"q")
    assert [f.name for f in dataclasses.fields(Message)] == ["topic", "payload", "qos", "retain"]
    assert repr(Message("t", b"p", 2, True)) == "Message(topic='t', payload=b'p', qos=2, retain=True)"


# -- exclusions --------------------------------------------------------------


def test_an_excluded_topic_is_not_delivered() -> None:
    router = Router()
    sub, other = Recorder(), Recorder()
    router.subscribe(sub, "tenants/alice/#", 1, ("tenants/alice/secrets/#",))
    router.subscribe(other, "#", 0)
    assert router.publish(Message("tenants/alice/x", b"1", 1)) == ROUTED
    # Only `other` matches the excluded topic, so it is still routed.
    assert router.publish(Message("tenants/alice/secrets/k", b"2", 1)) == ROUTED
    assert router.publish(Message("tenants/alice/secrets", b"3", 1)) == ROUTED  # `#` covers its parent level
    assert sub.topics() == ["tenants/alice/x"]
    assert other.topics() == ["tenants/alice/x", "tenants/alice/secrets/k", "tenants/alice/secrets"]


def test_an_exclusion_only_subscriber_gets_nothing_routed() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "#", 1, ("test/nosubscribe",))
    assert router.publish(Message("test/nosubscribe", b"x", 1)) == 0
    assert router.publish(Message("test/other", b"y", 1)) == ROUTED
    assert sub.topics() == ["test/other"]


@pytest.mark.parametrize("order", ["excluding_first", "matching_first"])
def test_overlapping_filters_excluded_by_one_matched_by_the_other_deliver_once(order: str) -> None:
    router = Router()
    sub = Recorder()
    subscriptions = [("a/#", 2, ("a/secret",)), ("a/+", 1, ())]
    if order == "matching_first":
        subscriptions.reverse()
    for topic_filter, qos, exclusions in subscriptions:
        router.subscribe(sub, topic_filter, qos, exclusions)
    router.publish(Message("a/secret", b"x", 2))
    # Once, at the qos of the filter that still matches (the excluding one does not count).
    assert sub.received == [("a/secret", b"x", 1, False)]
    router.publish(Message("a/open", b"y", 2))
    assert sub.received[-1] == ("a/open", b"y", 2, False)
    router.publish(Message("a/secret/deeper", b"z", 2))  # only `a/#` matches, and it does not exclude this
    assert sub.received[-1] == ("a/secret/deeper", b"z", 2, False)
    assert len(sub.received) == 3


def test_retained_messages_returned_by_subscribe_respect_exclusions() -> None:
    router = Router()
    for topic in ("a/x", "a/secret", "a/secret/k", "b"):
        router.publish(Message(topic, b"r", 1, True))
    got = router.subscribe(Recorder(), "a/#", 1, ("a/secret/#",))
    assert sorted(m.topic for m in got) == ["a/x"]
    got = router.subscribe(Recorder(), "#", 1, ("a/+", "b"))
    assert sorted(m.topic for m in got) == ["a/secret/k"]


def test_exclusions_are_checked_once_per_topic_in_the_match_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = router_module.topic_matches

    def counting(topic_filter: str, topic: str) -> bool:
        calls.append((topic_filter, topic))
        return real(topic_filter, topic)

    monkeypatch.setattr(router_module, "topic_matches", counting)
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/+", 1, ("a/secret", "a/hidden"))
    for _ in range(5):
        router.publish(Message("a/open", b"x"))
        router.publish(Message("a/secret", b"x"))
    assert sub.topics() == ["a/open"] * 5
    # One check per exclusion filter per distinct topic: on the cache miss, never on a hit.
    assert sorted(calls) == sorted([("a/secret", "a/open"), ("a/hidden", "a/open"), ("a/secret", "a/secret")])


def test_regrant_with_other_exclusions_invalidates_the_cache() -> None:
    router = Router()
    sub = Recorder()
    router.subscribe(sub, "a/+", 1, ("a/b",))
    router.publish(Message("a/b", b"1"))
    router.subscribe(sub, "a/+", 1)  # the deny entry went away
    router.publish(Message("a/b", b"2"))
    router.subscribe(sub, "a/+", 1, ("a/b",))
    router.publish(Message("a/b", b"3"))
    assert [p for _, p, _, _ in sub.received] == [b"2"]
    assert router.subscription_count == 1


# -- status bits, publishers and the memory budget -------------------------


def test_status_bits_of_subscribers_are_or_ed_with_routed() -> None:
    router = Router()
    stored, refused, plain = Recorder(STORED), Recorder(REFUSED), Recorder()
    router.subscribe(stored, "t", 1)
    router.subscribe(refused, "t", 1)
    router.subscribe(plain, "#", 1)
    assert router.publish(Message("t", b"x", 1)) == ROUTED | STORED | REFUSED
    assert router.publish(Message("u", b"x", 1)) == ROUTED
    assert router.publish(Message("$x", b"x", 1)) == 0


def test_a_raising_subscriber_adds_no_status(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    router.subscribe(Raising(), "t", 1)
    with caplog.at_level(logging.CRITICAL, logger="polygate.router"):
        assert router.publish(Message("t", b"x", 1)) == ROUTED
    assert router.delivery_errors == 1


class HoldRecorder:
    """A publisher that records who holds it."""

    refusable = True

    def __init__(self) -> None:
        self.holders: list[Blocker] = []

    def hold(self, blocker: Blocker) -> None:
        self.holders.append(blocker)

    def release(self, blocker: Blocker) -> None:
        self.holders.remove(blocker)


def test_the_publisher_is_handed_to_every_subscriber() -> None:
    router = Router()
    first, second = Recorder(), Recorder()
    router.subscribe(first, "t", 0)
    router.subscribe(second, "+", 0)
    publisher = HoldRecorder()
    router.publish(Message("t", b"x"), publisher)
    router.publish(Message("t", b"y"))
    assert first.publishers == [publisher, NO_PUBLISHER]
    assert second.publishers == [publisher, NO_PUBLISHER]


def test_the_memory_alarm_holds_every_publisher_until_it_clears() -> None:
    budget = MemoryBudget(1000)
    router = Router(budget=budget)
    assert router.budget is budget
    sub = Recorder()
    router.subscribe(sub, "t", 0)
    before, during, unrouted = HoldRecorder(), HoldRecorder(), HoldRecorder()
    router.publish(Message("t", b"x"), before)
    assert before.holders == []
    budget.add(1001)
    assert budget.alarm
    assert router.publish(Message("t", b"x"), during) == ROUTED  # still delivered, then held
    router.publish(Message("nobody/listens", b"x"), unrouted)  # held too: memory is short either way
    assert during.holders == [budget] and unrouted.holders == [budget]
    router.publish(Message("t", b"y"), during)
    assert during.holders == [budget]  # held once
    budget.sub(101)  # 900: not below 90% yet
    assert budget.alarm and during.holders == [budget]
    budget.sub(1)
    assert not budget.alarm
    assert during.holders == [] and unrouted.holders == [] and before.holders == []


def test_a_router_without_a_budget_never_holds() -> None:
    router = Router()
    assert router.budget.high == 0
    router.budget.add(10**12)
    assert not router.budget.alarm
    publisher = HoldRecorder()
    router.publish(Message("t", b"x"), publisher)
    assert publisher.holders == []


# -- the retained store ------------------------------------------------------


def test_retained_messages_are_written_to_a_durable_store() -> None:
    store = RecordingStore()
    router = Router(store=store)
    sub = Recorder()
    router.subscribe(sub, "a/#", 1)
    assert router.publish(Message("a/b", b"one", 1, True)) == ROUTED | STORED
    assert router.publish(Message("x", b"two", 0, True)) == STORED  # stored though nobody listens
    assert router.publish(Message("a/b", b"live", 1)) == ROUTED  # not retained: not written
    assert router.publish(Message("a/b", b"", 1, True)) == ROUTED | STORED  # cleared
    assert router.publish(Message("a/never", b"", 1, True)) == ROUTED  # nothing to clear
    assert store.calls == [("put_retained", "a/b", b"one"), ("put_retained", "x", b"two"), ("delete_retained", "a/b")]
    assert set(store.retained) == {"x"}


def test_a_retained_message_over_the_cap_is_not_written() -> None:
    store = RecordingStore()
    router = Router(store=store, max_retained=1)
    assert router.publish(Message("a", b"1", 0, True)) == STORED
    assert router.publish(Message("b", b"2", 0, True)) == 0
    assert router.retained_refused == 1
    assert store.ops("put_retained") == [("put_retained", "a", b"1")]


def test_a_store_that_keeps_nothing_is_not_written_to() -> None:
    router = Router(store=MemoryStore())
    assert router.publish(Message("a", b"1", 0, True)) == 0
    assert router.retained("a") == [Message("a", b"1", 0, True)]


def test_restore_retained_fills_the_router_without_writing() -> None:
    store = RecordingStore()
    router = Router(store=store, max_retained=2)
    router.restore_retained([Message("a/b", b"1", 1, True), Message("c", b"2", 0, True), Message("d", b"3", 0, True)])
    assert store.calls == []
    assert sorted(m.topic for m in router.retained("#")) == ["a/b", "c"]  # the cap still applies
    assert router.retained_refused == 1
    # The store is still used afterwards.
    assert router.publish(Message("a/b", b"", 0, True)) == STORED
    assert store.calls == [("delete_retained", "a/b")]
