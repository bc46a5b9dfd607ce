"""Routing keys and binding keys <-> gateway topics (RabbitMQ's MQTT convention).

A routing key is a topic with `/` written as `.` and `.` written as `/`, so
"a.b.c" is topic "a/b/c" and "v1/x.y" is "v1.x/y". A binding key on
`amq.topic` becomes a filter the same way, with `*` for `+` and `#` for `#`.
A binding key word that MQTT cannot express (a word holding `+` or `#`
other than the whole-word `#`, or `#` anywhere but last) is refused rather
than widened or narrowed; `*` inside a longer word is a literal on both sides.
"""

from __future__ import annotations

from gateway.errors import InvalidTopic
from gateway.topics import validate_topic_filter, validate_topic_name

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
