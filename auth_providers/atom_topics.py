"""Magistrala topics for the Atom provider: `m/<tenant>/c/<channel>[/<subtopic>...]`.

Pure functions, no I/O. `parse_topic` sorts a topic name or filter into one of
three answers:

- `Route`: a tenant and a channel, each an id (UUID) or an alias, and the rest
  after the channel. The provider resolves aliases and asks Atom's `Check`.
- `Unsupported`: outside the format; `unsupported_topic_policy` decides.
- `Refused`: denied whatever the policy: a wildcard or an empty value in the
  tenant or channel level, a tenant alias with a channel id, a malformed
  `$share/<group>/`, or a wildcard filter that could match a topic of the
  format without naming its tenant and channel (`#`, `+/+/+/+`, `m/acme/+/x`).

Soundness, which the property tests check: a filter that is a `Route` only
matches topics of that same tenant and channel, and a filter that is
`Unsupported` matches no topic that is a `Route`. So the answer for a filter
never widens what it covers. Routing still uses the topic as written; the
leading/trailing `/` trimming and the `$share/<group>/` removal only decide
which channel a topic belongs to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from gateway.topics import filters_intersect

#: Every topic of the format, with or without a subtopic.
FORMAT_FILTER: Final = "m/+/c/+/#"
SHARE_PREFIX: Final = "$share"
OBJECT_KIND: Final = "resource"

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_WILDCARDS: Final = ("+", "#")


def is_uuid(value: str) -> bool:
    """The canonical 8-4-4-4-12 hex form only: anything else in a topic is an alias."""
    return _UUID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    #: The topic as the client sent it.
    raw_topic: str
    #: Without `$share/<group>/` and leading/trailing `/`.
    topic: str
    #: As written in the topic.
    tenant: str
    channel: str
    #: The levels after the channel ("" when none): the subtopic or the filter's rest.
    rest: str

    def __post_init__(self) -> None:
        if not self.tenant or not self.channel:
            raise ValueError("a route needs a tenant and a channel")
        if any(w in self.tenant or w in self.channel for w in _WILDCARDS):
            raise ValueError("a route's tenant and channel are never wildcards")
        if not is_uuid(self.tenant) and is_uuid(self.channel):
            raise ValueError("a tenant alias with a channel id is not a route")

    @property
    def tenant_is_id(self) -> bool:
        return is_uuid(self.tenant)

    @property
    def channel_is_id(self) -> bool:
        return is_uuid(self.channel)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsupported:
    """Outside the format: `unsupported_topic_policy` decides."""

    raw_topic: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """Denied under either policy, without asking Atom."""

    reason: str


ParsedTopic = Route | Unsupported | Refused


@dataclass(frozen=True, slots=True, kw_only=True)
class AliasLookup:
    """One `ResolveAlias` request: exactly one of tenant_id and tenant_alias is set."""

    tenant_id: str
    tenant_alias: str
    object_alias: str
    object_kind: str = OBJECT_KIND


def parse_topic(raw_topic: str, *, is_filter: bool) -> ParsedTopic:
    """Sort a topic name (`is_filter` False) or a subscription filter into a route or not."""
    if not is_filter and any(w in raw_topic for w in _WILDCARDS):
        return Refused(reason="a topic name has no wildcards")
    topic = raw_topic
    if topic == SHARE_PREFIX or topic.startswith(SHARE_PREFIX + "/"):
        parts = topic.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2] or any(w in parts[1] for w in _WILDCARDS):
            return Refused(reason="malformed shared subscription: expected $share/<group>/<filter>")
        topic = parts[2]
    trimmed = topic.strip("/")
    levels = trimmed.split("/")
    if len(levels) >= 4 and levels[0] == "m" and levels[2] == "c":
        tenant, channel = levels[1], levels[3]
        if any(w in tenant for w in _WILDCARDS) or any(w in channel for w in _WILDCARDS):
            return Refused(reason="a wildcard in the tenant or channel level is never allowed")
        if not tenant or not channel:
            return Refused(reason="empty tenant or channel level")
        if not is_uuid(tenant) and is_uuid(channel):
            return Refused(reason="a tenant alias needs a channel alias, not a channel id")
        return Route(raw_topic=raw_topic, topic=trimmed, tenant=tenant, channel=channel, rest="/".join(levels[4:]))
    if is_filter and _reaches_format(topic.split("/")):
        return Refused(reason="the filter could match channel topics without naming the tenant and channel")
    return Unsupported(raw_topic=raw_topic)


def _reaches_format(levels: list[str]) -> bool:
    """Could the filter match a topic of the format, leading empty levels included?

    `/m/t/c/x` is channel x of tenant t once trimmed, so a filter whose first
    levels can match empty levels (`""` or `+`) is tried at each such offset.
    """
    for start in range(len(levels)):
        if start and levels[start - 1] not in ("", "+"):
            return False
        if filters_intersect("/".join(levels[start:]), FORMAT_FILTER):
            return True
    return False


def alias_lookup(route: Route) -> AliasLookup | None:
    """The `ResolveAlias` request for a route with a channel alias; None when the channel is an id."""
    if route.channel_is_id:
        return None
    if route.tenant_is_id:
        return AliasLookup(tenant_id=route.tenant.lower(), tenant_alias="", object_alias=route.channel.lower())
    return AliasLookup(tenant_id="", tenant_alias=route.tenant, object_alias=route.channel.lower())


def check_context(route: Route, *, protocol: str, is_filter: bool) -> dict[str, str]:
    """The `context` map of a `Check`, as DESIGN.md lists its keys."""
    return {
        "protocol": protocol,
        "raw_topic": route.raw_topic,
        "topic": route.topic,
        "route_tenant": route.tenant,
        "route_channel": route.channel,
        ("filter" if is_filter else "subtopic"): route.rest,
    }


def same_id(first: str, second: str) -> bool:
    """Ids compare without regard to case (UUIDs may be written either way); empty is never equal."""
    return bool(first) and first.lower() == second.lower()
