"""MQTT 3.1.1 topic names and filters: validation, matching, and filter algebra.

`filter_covers` and `filters_intersect` let ACLs authorize a subscription filter
as written: a filter is allowed only when an allow pattern matches every topic
the filter can match, and denied when any deny pattern could match one of them.
A wildcard is never widened.

Per MQTT-4.7.2-1 a filter starting with a wildcard does not match topics whose
first level starts with `$`.
"""

from __future__ import annotations

from gateway.errors import InvalidTopic

#: MQTT strings are length-prefixed by 16 bits.
MQTT_MAX_STRING = 65535


def _check_common(kind: str, value: str, max_length: int) -> None:
    if not value:
        raise InvalidTopic(f"{kind} must not be empty")
    if "\x00" in value:
        raise InvalidTopic(f"{kind} must not contain NUL")
    limit = min(max_length, MQTT_MAX_STRING) if max_length > 0 else MQTT_MAX_STRING
    # Character count is a lower bound of the UTF-8 length; only encode when close.
    if len(value) > limit or (len(value) * 4 > limit and len(value.encode("utf-8", "surrogatepass")) > limit):
        raise InvalidTopic(f"{kind} is longer than {limit} bytes")


def validate_topic_name(topic: str, max_length: int = MQTT_MAX_STRING) -> None:
    """A topic to publish to: no wildcards (MQTT-3.3.2-2)."""
    _check_common("topic", topic, max_length)
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"topic {topic!r} must not contain wildcards '+' or '#'")


def validate_topic_filter(topic_filter: str, max_length: int = MQTT_MAX_STRING) -> None:
    """A filter to subscribe with: `+` fills a whole level, `#` only as the whole last level."""
    _check_common("topic filter", topic_filter, max_length)
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise InvalidTopic(f"filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise InvalidTopic(f"filter {topic_filter!r}: '+' must be a whole level")


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` (a name, no wildcards) is matched by `topic_filter`."""
    if topic_filter == topic:
        return True
    if "+" not in topic_filter and "#" not in topic_filter:
        return False
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for index, f_level in enumerate(f_levels):
        if f_level == "#":
            return True
        if index >= len(t_levels):
            return False
        if f_level != "+" and f_level != t_levels[index]:
            return False
    return len(f_levels) == len(t_levels)


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """True when every topic `topic_filter` can match is also matched by `pattern`."""
    p_levels = pattern.split("/")
    f_levels = topic_filter.split("/")
    for index, f_level in enumerate(f_levels):
        if index >= len(p_levels):
            return False
        p_level = p_levels[index]
        if p_level == "#":
            # A leading wildcard in the pattern never reaches `$` topics.
            return not (index == 0 and f_level.startswith("$"))
        if f_level == "#":
            return False
        if f_level == "+":
            if p_level != "+":
                return False
        elif p_level == "+":
            if index == 0 and f_level.startswith("$"):
                return False
        elif p_level != f_level:
            return False
    # The filter ended. `a/#` also matches the parent `a`, so a pattern one
    # level longer that ends in '#' still covers it.
    rest = p_levels[len(f_levels):]
    return not rest or rest == ["#"]


def filters_intersect(first: str, second: str) -> bool:
    """True when at least one topic is matched by both filters."""
    a_levels = first.split("/")
    b_levels = second.split("/")
    for index in range(max(len(a_levels), len(b_levels))):
        a_level = a_levels[index] if index < len(a_levels) else None
        b_level = b_levels[index] if index < len(b_levels) else None
        if a_level is None or b_level is None:
            # One ended; they meet only on the parent level through a trailing '#'.
            longer = b_levels if a_level is None else a_levels
            return longer[index:] == ["#"]
        a_wild = a_level in ("+", "#")
        b_wild = b_level in ("+", "#")
        if index == 0 and (a_wild != b_wild):
            literal = b_level if a_wild else a_level
            if literal.startswith("$"):
                return False
        if a_level == "#" or b_level == "#":
            return True
        if not a_wild and not b_wild and a_level != b_level:
            return False
    return True
