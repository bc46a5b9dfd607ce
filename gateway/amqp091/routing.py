"""Routing keys and binding keys <-> gateway topics (RabbitMQ's MQTT convention).

A routing key is a topic with `/` written as `.` and `.` written as `/`, so
"a.b.c" is topic "a/b/c" and "v1/x.y" is "v1.x/y". A binding key on
`amq.topic` becomes a filter the same way, with `*` for `+` and `#` for `#`.
A binding key word that MQTT cannot express (a word holding `+` or `#`
other than the whole-word `#`, or `#` anywhere but last) is refused rather
than widened or narrowed; `*` inside a longer word is a literal on both sides.
"""

from __future__ import annotations

from gateway.amqp091.framing import exchange_and_key
from gateway.errors import InvalidTopic
from gateway.topics import validate_topic_filter, validate_topic_name

TOPIC_EXCHANGE = "amq.topic"
#: Routing keys whose topic `PublishRoutes` remembers; the table is cleared when full.
PUBLISH_ROUTES_SIZE = 10_000

_SWAP = str.maketrans("./", "/.")


def routing_key_to_topic(routing_key: str) -> str:
    return routing_key.translate(_SWAP)


def topic_to_routing_key(topic: str) -> str:
    return topic.translate(_SWAP)


def publish_topic(routing_key: str, max_length: int) -> str:
    """The topic a publish to amq.topic goes to; InvalidTopic when no topic can be named so."""
    topic = routing_key.translate(_SWAP)
    validate_topic_name(topic, max_length)
    return topic


class PublishRoutes:
    """Routing key -> (topic, encoded exchange and routing key) for publishes to amq.topic.

    Publishers repeat their keys, so the mapping, the topic check and the
    short-string encoding that every delivery carries are done once per key,
    not once per message. One table serves every connection (the topic limit
    is the gateway's); it is bounded and starts over when full.
    """

    __slots__ = ("known", "_max_topic", "_size")

    def __init__(self, max_topic_length: int, *, size: int = PUBLISH_ROUTES_SIZE) -> None:
        #: Read directly on the hot path; fill it through `learn`.
        self.known: dict[str, tuple[str, bytes]] = {}
        self._max_topic = max_topic_length
        self._size = size

    def learn(self, routing_key: str) -> tuple[str, bytes]:
        """The route of a key not in `known` yet; InvalidTopic (never remembered) when it names no topic."""
        route = (publish_topic(routing_key, self._max_topic), exchange_and_key(TOPIC_EXCHANGE, routing_key))
        known = self.known
        if len(known) >= self._size:
            known.clear()
        known[routing_key] = route
        return route


def binding_key_to_filter(binding_key: str, max_length: int) -> str:
    """The topic filter a binding key on amq.topic stands for; InvalidTopic when MQTT cannot say it."""
    words = binding_key.split(".")
    levels: list[str] = []
    for word in words:
        if word == "*":
            levels.append("+")
        elif word == "#":
            levels.append("#")
        elif "+" in word or "#" in word:
            raise InvalidTopic(
                f"binding key {binding_key!r}: the word {word!r} has no topic-filter equivalent "
                "(use '*' for one word and '#' for the rest)"
            )
        else:
            levels.append(word.replace("/", "."))
    topic_filter = "/".join(levels)
    validate_topic_filter(topic_filter, max_length)
    return topic_filter
