"""Routes authorized messages to subscribers: a topic trie, retained messages, delivery QoS.

The router sees only messages and subscriptions that were already authorized
and filters that were already validated (gateway.topics.validate_topic_filter).
It is on the hot path, so `publish` is synchronous and, on a match-cache hit,
costs one dict lookup plus one `deliver` call per subscriber: no task, no
await, no allocation. Subscribers own bounded queues; `deliver` never blocks.

The flow contract, the same for every protocol on either side: `publish`
takes the message's publisher and hands it to every subscriber, whose queue
may hold that publisher back (`gateway.backpressure`). It returns status
bits that tell the publisher's frontend when and how to acknowledge:
`ROUTED` (some subscriber matched), `STORED` (a durable queue or the retained
store wrote it: acknowledge once the store commits) and `REFUSED` (a full
queue refused it: say so where the protocol can).

Semantics are MQTT 3.1.1: `+` matches exactly one level (an empty one too),
`#` matches the parent level and any number of children, and a filter that
starts with a wildcard never matches a topic whose first level starts with
`$` (MQTT-4.7.2-1). A subscriber whose filters overlap receives a message
once, at min(message qos, its highest granted qos among the matching filters).
A subscription may carry exclusions: filters whose topics it must not receive
(the parts of a granted filter that a deny ACL entry covers). They are
checked once per distinct topic, when its subscribers are matched and cached.
"""

from __future__ import annotations

import logging
import typing

from gateway.backpressure import NO_PUBLISHER, Publisher
from gateway.message import Message
from gateway.queues import REFUSED, STORED, MemoryBudget
from gateway.store.base import Store
from gateway.topics import is_wildcard, topic_matches, validate_topic_name

__all__ = ["Message", "ROUTED", "REFUSED", "STORED", "Router", "Subscriber"]

logger = logging.getLogger("polygate.router")

#: Topics whose subscriber lists are remembered; the cache is cleared when full.
MATCH_CACHE_SIZE = 10_000

#: Status bit of `publish`: at least one subscriber matched.
ROUTED = 1


class Subscriber(typing.Protocol):
    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        """Non-blocking; the subscriber's queue applies its bound and policy. Returns STORED/REFUSED bits or 0."""


#: What a trie node holds per subscriber: (subscriber, granted qos, exclusions).
_Entry = tuple[Subscriber, int, tuple[str, ...]]
#: What the match cache holds per subscriber: (subscriber, granted qos).
_Target = tuple[Subscriber, int]


class _Node:
    """One level of the subscription trie. Keys of `subscribers` are id(subscriber)."""

    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[int, _Entry] = {}


class _RetainedNode:
    """One level of the retained trie; `message` is set when a message is retained here."""

    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _RetainedNode] = {}
        self.message: Message | None = None


class _Client:
    """Everything the router knows about one subscriber, for unsubscribe_all."""

    __slots__ = ("subscriber", "filters", "failure_logged")

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.filters: dict[str, int] = {}
        self.failure_logged = False


class Router:
    """The local router: one process, one topic space.

    Subscribers are keyed by id() because a subscriber's own __eq__/__hash__
    may compare by value; the router holds a strong reference to every
    subscribed object, so an id cannot be reused while it is in the trie.
    """

    def __init__(
        self,
        *,
        max_retained: int = 100000,
        max_topic_length: int = 1024,
        budget: MemoryBudget | None = None,
        store: Store | None = None,
    ) -> None:
        if max_retained < 0:
            raise ValueError(f"max_retained must be 0 (no cap) or positive, not {max_retained}")
        self._max_retained = max_retained
        self._max_topic_length = max_topic_length
        self._root = _Node()
        self._clients: dict[int, _Client] = {}
        self._subscription_count = 0
        # topic -> subscribers matching it, de-duplicated at their highest qos.
        # Every entry was computed for a validated topic, so a hit skips validation.
        self._match_cache: dict[str, tuple[_Target, ...]] = {}
        self._match_cache_size = MATCH_CACHE_SIZE
        # The dict makes a literal lookup O(1); the trie serves wildcard filters
        # without scanning every retained topic (a subscribe storm on
        # `devices/+/state` against 100k retained topics would otherwise be quadratic).
        self._retained: dict[str, _RetainedNode] = {}
        self._retained_root = _RetainedNode()
        #: New retained topics refused because max_retained was reached (the caller logs).
        self.retained_refused = 0
        #: Calls to Subscriber.deliver that raised.
        self.delivery_errors = 0
        #: Queued messages in memory, all subscribers together (the memory watermark).
        self.budget = budget if budget is not None else MemoryBudget(0)
        #: Where retained messages are kept across restarts (None: in memory only).
        self._store = store if store is not None and store.durable else None

    # -- subscriptions -------------------------------------------------------

    def subscribe(
        self, subscriber: Subscriber, topic_filter: str, qos: int, exclusions: tuple[str, ...] = ()
    ) -> list[Message]:
        """Add or re-grant a subscription; return the retained messages it matches.

        The caller sends those itself, at min(message.qos, qos), with retain set.
        `exclusions`: filters whose topics this subscription must not receive.
        """
        key = id(subscriber)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client(subscriber)
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if topic_filter not in client.filters:
            self._subscription_count += 1
        client.filters[topic_filter] = qos
        node.subscribers[key] = (subscriber, qos, exclusions)
        self._invalidate(topic_filter)
        retained = self.retained(topic_filter)
        if exclusions and retained:
            retained = [message for message in retained if not _excluded(exclusions, message.topic)]
        return retained

    def unsubscribe(self, subscriber: Subscriber, topic_filter: str) -> bool:
        """Remove one subscription; False when the subscriber did not hold it."""
        key = id(subscriber)
        client = self._clients.get(key)
        if client is None or client.filters.pop(topic_filter, None) is None:
            return False
        self._remove(key, topic_filter)
        self._subscription_count -= 1
        if not client.filters:
            del self._clients[key]
        self._invalidate(topic_filter)
        return True

    def unsubscribe_all(self, subscriber: Subscriber) -> None:
        """Remove every subscription of a subscriber (its connection or session ended)."""
        client = self._clients.pop(id(subscriber), None)
        if client is None:
            return
        key = id(subscriber)
        for topic_filter in client.filters:
            self._remove(key, topic_filter)
            self._invalidate(topic_filter)
        self._subscription_count -= len(client.filters)

    def subscriptions(self, subscriber: Subscriber) -> dict[str, int]:
        """A copy of the subscriber's filters and their granted qos."""
        client = self._clients.get(id(subscriber))
        return dict(client.filters) if client is not None else {}

    @property
    def subscription_count(self) -> int:
        return self._subscription_count

    def _remove(self, key: int, topic_filter: str) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            path.append((node, level))
            node = node.children[level]
        del node.subscribers[key]
        # Prune from the leaf up so subscribe/unsubscribe churn leaves no nodes behind.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subscribers or child.children:
                break
            del parent.children[level]

    def _invalidate(self, topic_filter: str) -> None:
        if is_wildcard(topic_filter):
            self._match_cache.clear()
        else:
            # A literal filter matches exactly one topic: only that entry is stale.
            self._match_cache.pop(topic_filter, None)

    # -- publishing ----------------------------------------------------------

    def publish(self, message: Message, publisher: Publisher = NO_PUBLISHER) -> int:
        """Store or clear the retained message, then deliver; return the status bits.

        ROUTED when a subscriber matched, STORED when a durable write must commit
        before the publisher is acknowledged, REFUSED when a full queue refused it.
        Raises gateway.errors.InvalidTopic for a topic the frontends should
        never have let through (checked once per topic, on a cache miss).
        """
        topic = message.topic
        targets = self._match_cache.get(topic)
        if targets is None:
            validate_topic_name(topic, self._max_topic_length)
            targets = self._match(topic)
            if len(self._match_cache) >= self._match_cache_size:
                self._match_cache.clear()
            self._match_cache[topic] = targets
        status = self._store_retained(message) if message.retain else 0
        if self.budget.alarm and publisher is not NO_PUBLISHER:
            # Memory is short: this publisher's next publishes wait until consumers catch up.
            self.budget.held.hold(publisher)
        if not targets:
            return status
        qos = message.qos
        status |= ROUTED
        # `targets` is an immutable snapshot, so a subscriber may (un)subscribe
        # from inside deliver without disturbing this loop.
        for subscriber, granted in targets:
            try:
                status |= subscriber.deliver(message, granted if granted < qos else qos, False, publisher)
            except Exception:
                self._delivery_failed(subscriber, topic)
        return status

    def _match(self, topic: str) -> tuple[_Target, ...]:
        levels = topic.split("/")
        found: dict[int, _Target] = {}
        nodes = [self._root]
        for depth, level in enumerate(levels):
            following: list[_Node] = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                # MQTT-4.7.2-1: leading wildcards skip `$` topics; deeper ones do not.
                if depth or level[:1] != "$":
                    wild = children.get("#")
                    if wild is not None:
                        _merge(found, wild.subscribers, topic)
                    wild = children.get("+")
                    if wild is not None:
                        following.append(wild)
                child = children.get(level)
                if child is not None:
                    following.append(child)
            if not following:
                break
            nodes = following
        else:
            for node in nodes:
                _merge(found, node.subscribers, topic)
                # `a/#` matches `a` itself.
                wild = node.children.get("#")
                if wild is not None:
                    _merge(found, wild.subscribers, topic)
        return tuple(found.values())

    def _delivery_failed(self, subscriber: Subscriber, topic: str) -> None:
        self.delivery_errors += 1
        client = self._clients.get(id(subscriber))
        if client is not None and client.subscriber is subscriber:
            if client.failure_logged:
                logger.debug("subscriber %s raised again on topic %r", type(subscriber).__qualname__, topic)
                return
            client.failure_logged = True
        # Once per subscriber with the traceback: a broken subscriber must not flood the log.
        logger.exception(
            "subscriber %s raised while receiving a message on topic %r; the other subscribers still got it "
            "(further errors from it are counted in delivery_errors)",
            type(subscriber).__qualname__, topic,
        )

    # -- retained messages ---------------------------------------------------

    def _store_retained(self, message: Message) -> int:
        """Keep (or clear) the retained message of its topic; STORED when the store wrote it."""
        topic = message.topic
        node = self._retained.get(topic)
        store = self._store
        if not message.payload:
            # MQTT-3.3.1-10/11: an empty retained payload clears the topic.
            if node is not None:
                del self._retained[topic]
                self._unlink_retained(topic)
                if store is not None:
                    store.delete_retained(topic)
                    return STORED
            return 0
        if node is None:
            if self._max_retained and len(self._retained) >= self._max_retained:
                self.retained_refused += 1
                if self.retained_refused == 1 or self.retained_refused % 1000 == 0:
                    logger.warning(
                        "retained message on %r not stored: limits.max_retained_messages (%d) reached"
                        " (%d refused so far; it was still delivered to current subscribers)",
                        topic, self._max_retained, self.retained_refused,
                        extra={"event": "retained_refused", "topic": topic},
                    )
                return 0
            node = self._retained_root
            for level in topic.split("/"):
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _RetainedNode()
                node = child
            self._retained[topic] = node
        node.message = message
        if store is not None:
            store.put_retained(message)
            return STORED
        return 0

    def restore_retained(self, messages: list[Message]) -> None:
        """Retained messages the store kept across a restart (before any listener opens)."""
        store, self._store = self._store, None
        try:
            for message in messages:
                self._store_retained(message)
        finally:
            self._store = store

    def _unlink_retained(self, topic: str) -> None:
        path: list[tuple[_RetainedNode, str]] = []
        node = self._retained_root
        for level in topic.split("/"):
            path.append((node, level))
            node = node.children[level]
        node.message = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.message is not None or child.children:
                break
            del parent.children[level]

    def retained(self, topic_filter: str) -> list[Message]:
        """The retained messages a (valid) filter matches."""
        if not is_wildcard(topic_filter):
            node = self._retained.get(topic_filter)
            return [node.message] if node is not None and node.message is not None else []
        levels = topic_filter.split("/")
        last = len(levels)
        found: list[Message] = []
        # Explicit stacks, not recursion: a topic may have thousands of levels.
        stack: list[tuple[_RetainedNode, int]] = [(self._retained_root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.message is not None:
                    found.append(node.message)
                continue
            level = levels[depth]
            if level == "#":
                # The parent level (`a` for `a/#`; the root holds nothing) and everything below.
                if node.message is not None:
                    found.append(node.message)
                subtree = [child for name, child in node.children.items() if depth or name[:1] != "$"]
                while subtree:
                    below = subtree.pop()
                    if below.message is not None:
                        found.append(below.message)
                    subtree.extend(below.children.values())
            elif level == "+":
                for name, child in node.children.items():
                    if depth or name[:1] != "$":
                        stack.append((child, depth + 1))
            else:
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, depth + 1))
        return found

    @property
    def retained_count(self) -> int:
        return len(self._retained)


def _merge(found: dict[int, _Target], subscribers: dict[int, _Entry], topic: str) -> None:
    for key, (subscriber, qos, exclusions) in subscribers.items():
        if exclusions and _excluded(exclusions, topic):
            continue
        previous = found.get(key)
        if previous is None or previous[1] < qos:
            found[key] = (subscriber, qos)


def _excluded(exclusions: tuple[str, ...], topic: str) -> bool:
    for topic_filter in exclusions:
        if topic_matches(topic_filter, topic):
            return True
    return False
