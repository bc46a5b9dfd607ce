"""ACL entries of the local store and their evaluation, in memory and without I/O.

An entry is a pattern in MQTT filter syntax plus the operations it allows (or,
for a deny entry, forbids). `%u` (username) and `%c` (client id) each stand for
exactly one whole topic level. Entries are compiled once per (user, client id)
so that deciding a publish or subscribe is a set lookup and a few pattern
matches.

Placeholder values that could change a pattern's meaning (empty, containing
`/`, `+` or `#`, or starting with `$` in the first level, where `$` topics are
reserved) are never substituted: an allow entry with such a value does not
match at all, so a client cannot widen its rights by choosing its client id.
A deny entry with such a value instead forbids every value of that level
(`+`), because dropping a deny would widen the rights just the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from gateway.errors import InvalidTopic, StoreError
from gateway.events import Decision
from gateway.topics import filter_covers, filters_intersect, validate_topic_filter

PUBLISH = "publish"
SUBSCRIBE = "subscribe"
OPS: frozenset[str] = frozenset({PUBLISH, SUBSCRIBE})
USERNAME_PLACEHOLDER = "%u"
CLIENT_ID_PLACEHOLDER = "%c"
_PLACEHOLDERS = (USERNAME_PLACEHOLDER, CLIENT_ID_PLACEHOLDER)
_ALLOW = Decision.allow()


@dataclass(frozen=True, slots=True, kw_only=True)
class AclEntry:
    """One row of the ACL table: `deny` entries override every allow that matches."""

    username: str
    pattern: str
    ops: frozenset[str]
    deny: bool = False

    def __post_init__(self) -> None:
        validate_ops(self.ops)


def validate_ops(ops: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(ops)
    if not chosen:
        raise StoreError("an ACL entry needs at least one operation: publish, subscribe")
    unknown = chosen - OPS
    if unknown:
        raise StoreError(
            f"unknown ACL operation {', '.join(sorted(unknown))}; use publish, subscribe or both"
        )
    return chosen


def validate_pattern(pattern: str) -> None:
    """Raise StoreError unless `pattern` is a topic filter whose placeholders fill whole levels."""
    if not pattern:
        raise StoreError("an ACL pattern must not be empty")
    levels = pattern.split("/")
    for level in levels:
        for placeholder in _PLACEHOLDERS:
            if placeholder in level and level != placeholder:
                raise StoreError(
                    f"ACL pattern {pattern!r}: {placeholder} must be a whole topic level "
                    f"(e.g. 'devices/{placeholder}/#')"
                )
    # A placeholder stands for one ordinary level; check the rest as a filter.
    concrete = "/".join("x" if level in _PLACEHOLDERS else level for level in levels)
    try:
        validate_topic_filter(concrete)
    except InvalidTopic as exc:
        raise StoreError(f"ACL pattern {pattern!r} is not a valid topic filter: {exc}") from exc


def _usable(value: str, first_level: bool) -> bool:
    if not value or "/" in value or "+" in value or "#" in value:
        return False
    return not (first_level and value.startswith("$"))


def expand(pattern: str, *, username: str, client_id: str, deny: bool) -> str | None:
    """The pattern with placeholders filled in; None when an allow entry cannot apply."""
    if "%" not in pattern:
        return pattern
    levels = pattern.split("/")
    for index, level in enumerate(levels):
        if level == USERNAME_PLACEHOLDER:
            value = username
        elif level == CLIENT_ID_PLACEHOLDER:
            value = client_id
        else:
            continue
        if _usable(value, index == 0):
            levels[index] = value
        elif deny:
            levels[index] = "+"
        else:
            return None
    return "/".join(levels)


class AclChecker(TypingProtocol):
    def check_publish(self, topic: str) -> Decision: ...

    def check_subscribe(self, topic_filter: str) -> Decision: ...


class AllowAll:
    """A superuser's rights."""

    __slots__ = ()

    def check_publish(self, topic: str) -> Decision:
        return _ALLOW

    def check_subscribe(self, topic_filter: str) -> Decision:
        return _ALLOW


class DenyAll:
    """For an identity that no longer has a user behind it."""

    __slots__ = ("_reason",)

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def check_publish(self, topic: str) -> Decision:
        return Decision.deny(self._reason)

    def check_subscribe(self, topic_filter: str) -> Decision:
        return Decision.deny(self._reason)


class _Node:
    __slots__ = ("children", "plus", "hash", "end")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        #: A pattern ends here with `#`: it matches this level and everything below.
        self.hash = False
        #: A pattern ends exactly here.
        self.end = False


class _TopicTrie:
    """Wildcard patterns by level, so matching a topic costs its depth, not the number of patterns.

    Same answers as `gateway.topics.topic_matches` for any of the patterns
    (tests compare the two), including MQTT-4.7.2-1 for `$` topics.
    """

    __slots__ = ("_root", "_empty")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._root = _Node()
        self._empty = True
        for pattern in patterns:
            self._empty = False
            node = self._root
            for level in pattern.split("/"):
                if level == "#":
                    node.hash = True
                    break
                if level == "+":
                    if node.plus is None:
                        node.plus = _Node()
                    node = node.plus
                else:
                    node = node.children.setdefault(level, _Node())
            else:
                node.end = True

    def matches(self, levels: list[str]) -> bool:
        if self._empty:
            return False
        return _match(self._root, levels, 0)


def _match(node: _Node, levels: list[str], index: int) -> bool:
    # A wildcard in the first level never matches a `$` topic.
    if node.hash and not (index == 0 and levels[0].startswith("$")):
        return True
    if index == len(levels):
        return node.end
    level = levels[index]
    child = node.children.get(level)
    if child is not None and _match(child, levels, index + 1):
        return True
    if node.plus is not None and not (index == 0 and level.startswith("$")):
        return _match(node.plus, levels, index + 1)
    return False


class _Patterns:
    """Patterns split so that the common case, a literal topic, is one set lookup."""

    __slots__ = ("exact", "wild", "_trie")

    def __init__(self, patterns: Iterable[str]) -> None:
        unique = dict.fromkeys(patterns)
        self.exact: frozenset[str] = frozenset(p for p in unique if "+" not in p and "#" not in p)
        self.wild: tuple[str, ...] = tuple(p for p in unique if "+" in p or "#" in p)
        self._trie = _TopicTrie(self.wild)

    def match_topic(self, topic: str, levels: list[str]) -> bool:
        return topic in self.exact or self._trie.matches(levels)

    def intersecting(self, topic_filter: str) -> tuple[str, ...]:
        """The patterns that could match at least one topic of the filter."""
        return tuple(sorted(p for p in (*self.exact, *self.wild) if filters_intersect(p, topic_filter)))

    def cover_filter(self, topic_filter: str) -> bool:
        # A literal pattern covers only the identical filter.
        if topic_filter in self.exact:
            return True
        for pattern in self.wild:
            if filter_covers(pattern, topic_filter):
                return True
        return False


class CompiledAcl:
    """The entries of one user, with placeholders filled in for one client id."""

    __slots__ = ("_publish_allow", "_publish_deny", "_subscribe_allow", "_subscribe_deny")

    def __init__(self, entries: Iterable[AclEntry], *, username: str, client_id: str) -> None:
        buckets: dict[tuple[str, bool], list[str]] = {
            (PUBLISH, False): [],
            (PUBLISH, True): [],
            (SUBSCRIBE, False): [],
            (SUBSCRIBE, True): [],
        }
        for entry in entries:
            pattern = expand(entry.pattern, username=username, client_id=client_id, deny=entry.deny)
            if pattern is None:
                continue
            for op in entry.ops:
                buckets[(op, entry.deny)].append(pattern)
        self._publish_allow = _Patterns(buckets[(PUBLISH, False)])
        self._publish_deny = _Patterns(buckets[(PUBLISH, True)])
        self._subscribe_allow = _Patterns(buckets[(SUBSCRIBE, False)])
        self._subscribe_deny = _Patterns(buckets[(SUBSCRIBE, True)])

    def check_publish(self, topic: str) -> Decision:
        levels = topic.split("/")
        if self._publish_deny.match_topic(topic, levels):
            return Decision.deny(f"a deny ACL entry forbids publish on {topic!r}")
        if self._publish_allow.match_topic(topic, levels):
            return _ALLOW
        return Decision.deny(f"no ACL entry allows publish on {topic!r}")

    def check_subscribe(self, topic_filter: str) -> Decision:
        """Authorize the filter as written: one allow entry must cover all of it.

        A deny entry that covers the whole filter refuses it; deny entries that
        cover part of it narrow it: the subscription is granted with them as
        exclusions, applied to each message at delivery.
        """
        deny = self._subscribe_deny
        if deny.cover_filter(topic_filter):
            return Decision.deny(f"a deny ACL entry forbids subscribe to {topic_filter!r}")
        if not self._subscribe_allow.cover_filter(topic_filter):
            return Decision.deny(f"no ACL entry allows subscribe to {topic_filter!r}")
        exclusions = deny.intersecting(topic_filter)
        return Decision.allow(exclusions=exclusions) if exclusions else _ALLOW
