"""The router against a brute force built on gateway.topics.topic_matches."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from gateway.backpressure import Publisher
from gateway.router import ROUTED, Message, Router
from gateway.topics import topic_matches, validate_topic_filter, validate_topic_name

# Few level names so that filters and topics collide often; `$s` exercises MQTT-4.7.2-1.
LEVELS = st.sampled_from(["a", "b", "", "$s"])
SUBSCRIBERS = 4

topics = st.lists(LEVELS, min_size=1, max_size=4).map("/".join).filter(lambda t: t != "")
filters = st.one_of(
    st.just("#"),
    st.tuples(
        st.lists(st.one_of(LEVELS, st.just("+")), min_size=1, max_size=4),
        st.booleans(),
    ).map(lambda parts: "/".join(parts[0] + (["#"] if parts[1] else []))),
).filter(lambda f: f != "")
qos_values = st.integers(min_value=0, max_value=2)
#: Exclusions of a subscription (the deny entries intersecting a granted filter): mostly none.
exclusion_lists = st.one_of(st.just(()), st.lists(filters, min_size=1, max_size=2).map(tuple))


class Recorder:
    """Equal to every other Recorder, so only identity can tell them apart."""

    def __init__(self) -> None:
        self.received: list[tuple[Message, int, bool]] = []

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        self.received.append((message, qos, retain))
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recorder)

    def __hash__(self) -> int:
        return 0


Model = dict[tuple[int, str], tuple[int, tuple[str, ...]]]


def receives(topic_filter: str, exclusions: tuple[str, ...], topic: str) -> bool:
    return topic_matches(topic_filter, topic) and not any(topic_matches(e, topic) for e in exclusions)


def expected_deliveries(model: Model, topic: str, publish_qos: int) -> dict[int, int]:
    best: dict[int, int] = {}
    for (index, topic_filter), (granted, exclusions) in model.items():
        if receives(topic_filter, exclusions, topic):
            best[index] = max(best.get(index, -1), granted)
    return {index: min(granted, publish_qos) for index, granted in best.items()}


def test_strategies_only_make_valid_input() -> None:
    @given(filters, topics, exclusion_lists)
    @settings(max_examples=60)
    def check(topic_filter: str, topic: str, exclusions: tuple[str, ...]) -> None:
        validate_topic_filter(topic_filter)
        validate_topic_name(topic)
        for excluded in exclusions:
            validate_topic_filter(excluded)

    check()


@given(
    subscriptions=st.lists(
        st.tuples(st.integers(0, SUBSCRIBERS - 1), filters, qos_values, exclusion_lists), max_size=12
    ),
    publishes=st.lists(st.tuples(topics, qos_values), min_size=1, max_size=8),
)
@settings(max_examples=150, deadline=None)
def test_delivery_equals_brute_force(
    subscriptions: list[tuple[int, str, int, tuple[str, ...]]], publishes: list[tuple[str, int]]
) -> None:
    router = Router()
    subscribers = [Recorder() for _ in range(SUBSCRIBERS)]
    model: Model = {}
    for index, topic_filter, qos, exclusions in subscriptions:
        router.subscribe(subscribers[index], topic_filter, qos, exclusions)
        model[(index, topic_filter)] = (qos, exclusions)
    assert router.subscription_count == len(model)
    for topic, publish_qos in publishes:
        for subscriber in subscribers:
            subscriber.received.clear()
        message = Message(topic, b"payload", publish_qos)
        delivered = router.publish(message)
        expected = expected_deliveries(model, topic, publish_qos)
        got = {index: [(m, q, r) for m, q, r in s.received] for index, s in enumerate(subscribers) if s.received}
        assert got == {index: [(message, qos, False)] for index, qos in expected.items()}
        assert delivered == (ROUTED if expected else 0)


class RouterMachine(RuleBasedStateMachine):
    """Random interleavings of (un)subscribe and publish, so the match cache and pruning are exercised."""

    MAX_RETAINED = 4
    # Topics seen before, reused as topics and as literal filters: a stale match-cache entry shows up
    # only when the same topic is published again after a subscription change.
    published = Bundle("published")

    @initialize()
    def start(self) -> None:
        self.router = Router(max_retained=self.MAX_RETAINED)
        self.subscribers = [Recorder() for _ in range(SUBSCRIBERS)]
        self.model: Model = {}
        self.retained: dict[str, Message] = {}
        self.refused = 0

    @rule(
        index=st.integers(0, SUBSCRIBERS - 1),
        topic_filter=filters | published,
        qos=qos_values,
        exclusions=exclusion_lists | published.map(lambda topic: (topic,)),
    )
    def subscribe(self, index: int, topic_filter: str, qos: int, exclusions: tuple[str, ...]) -> None:
        got = self.router.subscribe(self.subscribers[index], topic_filter, qos, exclusions)
        self.model[(index, topic_filter)] = (qos, exclusions)
        expected = [m for t, m in self.retained.items() if receives(topic_filter, exclusions, t)]
        assert sorted(got, key=lambda m: m.topic) == sorted(expected, key=lambda m: m.topic)

    @rule(index=st.integers(0, SUBSCRIBERS - 1), topic_filter=filters | published)
    def unsubscribe(self, index: int, topic_filter: str) -> None:
        held = self.model.pop((index, topic_filter), None) is not None
        assert self.router.unsubscribe(self.subscribers[index], topic_filter) is held

    @rule(index=st.integers(0, SUBSCRIBERS - 1))
    def unsubscribe_all(self, index: int) -> None:
        self.router.unsubscribe_all(self.subscribers[index])
        self.model = {key: qos for key, qos in self.model.items() if key[0] != index}

    @rule(
        target=published, topic=topics | published, publish_qos=qos_values, retain=st.booleans(), empty=st.booleans()
    )
    def publish(self, topic: str, publish_qos: int, retain: bool, empty: bool) -> str:
        for subscriber in self.subscribers:
            subscriber.received.clear()
        message = Message(topic, b"" if empty else b"p", publish_qos, retain)
        delivered = self.router.publish(message)
        if retain:
            if empty:
                self.retained.pop(topic, None)
            elif topic in self.retained or len(self.retained) < self.MAX_RETAINED:
                self.retained[topic] = message
            else:
                self.refused += 1
        expected = expected_deliveries(self.model, topic, publish_qos)
        got = {index: list(s.received) for index, s in enumerate(self.subscribers) if s.received}
        assert got == {index: [(message, qos, False)] for index, qos in expected.items()}
        assert delivered == (ROUTED if expected else 0)
        return topic

    @rule(topic_filter=filters)
    def retained_by_filter(self, topic_filter: str) -> None:
        got = self.router.retained(topic_filter)
        expected = [m for t, m in self.retained.items() if topic_matches(topic_filter, t)]
        assert sorted(got, key=lambda m: m.topic) == sorted(expected, key=lambda m: m.topic)

    @rule(topic=topics | published)
    def retained_by_literal(self, topic: str) -> None:
        expected = [self.retained[topic]] if topic in self.retained else []
        assert self.router.retained(topic) == expected

    @invariant()
    def counts_and_subscriptions(self) -> None:
        assert self.router.subscription_count == len(self.model)
        assert self.router.retained_count == len(self.retained)
        assert self.router.retained_refused == self.refused
        for index, subscriber in enumerate(self.subscribers):
            mine = {f: qos for (i, f), (qos, _) in self.model.items() if i == index}
            assert self.router.subscriptions(subscriber) == mine

    @invariant()
    def tries_hold_only_live_paths(self) -> None:
        # Pruning: every trie node lies on the path of a live filter / stored topic.
        live = {tuple(f.split("/")[:n]) for (_, f) in self.model for n in range(1, f.count("/") + 2)}
        assert _paths(self.router._root) == live
        stored = {tuple(t.split("/")[:n]) for t in self.retained for n in range(1, t.count("/") + 2)}
        assert _paths(self.router._retained_root) == stored


def _paths(root: object) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    stack = [((), root)]
    while stack:
        prefix, node = stack.pop()
        for name, child in node.children.items():  # type: ignore[attr-defined]
            found.add(prefix + (name,))
            stack.append((prefix + (name,), child))
    return found


RouterMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestRouterMachine = RouterMachine.TestCase
