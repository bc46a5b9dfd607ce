"""The magistrala topic parser of the Atom provider: plain values, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auth_providers.atom_topics import (
    AliasLookup,
    Refused,
    Route,
    Unsupported,
    alias_lookup,
    check_context,
    is_uuid,
    parse_topic,
    same_id,
)
from gateway.topics import topic_matches

TENANT = "6f1c0a52-3d4b-4c7e-9a51-0d2f7e8b9c10"
CHANNEL = "0b9e8d7c-6a5b-4c3d-8e2f-1a0b9c8d7e6f"


def route(topic: str, *, is_filter: bool = False) -> Route:
    parsed = parse_topic(topic, is_filter=is_filter)
    assert isinstance(parsed, Route), parsed
    return parsed


@pytest.mark.parametrize(
    ("topic", "tenant", "channel", "rest", "trimmed"),
    [
        ("m/acme/c/sensors", "acme", "sensors", "", "m/acme/c/sensors"),
        ("m/acme/c/sensors/temp", "acme", "sensors", "temp", "m/acme/c/sensors/temp"),
        ("/m/acme/c/Sensors/a/b/", "acme", "Sensors", "a/b", "m/acme/c/Sensors/a/b"),
        ("//m/acme/c/s//", "acme", "s", "", "m/acme/c/s"),
        (f"m/{TENANT}/c/{CHANNEL}/x", TENANT, CHANNEL, "x", f"m/{TENANT}/c/{CHANNEL}/x"),
        (f"m/{TENANT}/c/sensors", TENANT, "sensors", "", f"m/{TENANT}/c/sensors"),
        ("$share/g1/m/acme/c/s/t", "acme", "s", "t", "m/acme/c/s/t"),
        ("m/acme/c/s/a//b", "acme", "s", "a//b", "m/acme/c/s/a//b"),
    ],
)
def test_topics_of_the_format(topic: str, tenant: str, channel: str, rest: str, trimmed: str) -> None:
    parsed = route(topic)
    assert (parsed.tenant, parsed.channel, parsed.rest, parsed.topic, parsed.raw_topic) == (
        tenant, channel, rest, trimmed, topic,
    )


@pytest.mark.parametrize(
    ("topic_filter", "rest"),
    [("m/acme/c/s/#", "#"), ("m/acme/c/s/+/t", "+/t"), ("$share/g/m/acme/c/s/+", "+"), ("m/acme/c/s", "")],
)
def test_filters_of_the_format_keep_their_wildcards_after_the_channel(topic_filter: str, rest: str) -> None:
    assert route(topic_filter, is_filter=True).rest == rest


@pytest.mark.parametrize(
    "topic_filter",
    [
        "m/+/c/x", "m/acme/c/#", "m/acme/c/+", "m/#", "#", "+/#", "m/acme/+/x", "+/acme/c/x", "m/acme/#",
        "+/+/+/+", "/#", "+/m/acme/c/x", "/+/m/acme/c/x/#", "$share/g/#", "$share/g/m/+/c/x", "m/+/c/+/#",
    ],
)
def test_wildcards_that_reach_tenants_or_channels_are_refused(topic_filter: str) -> None:
    assert isinstance(parse_topic(topic_filter, is_filter=True), Refused)


@pytest.mark.parametrize(
    "topic",
    ["m//c/x", "m/acme/c//y", f"m/acme/c/{CHANNEL}", "$share", "$share/g", "$share//m/a/c/x", "$share/+/m/a/c/x",
     "$share/g/", "m/acme/c/x/+"],
)
def test_malformed_topics_are_refused(topic: str) -> None:
    # The last one: a topic name (not a filter) never has a wildcard.
    assert isinstance(parse_topic(topic, is_filter=False), Refused)


@pytest.mark.parametrize(
    ("topic", "is_filter"),
    [
        ("plain/topic", False), ("m/acme/c", False), ("m/acme", False), ("M/acme/c/x", False),
        ("m/acme/x/y", False), ("devices/+/status", True), ("a/#", True), ("+", True), ("x/+/m/acme/c/y", True),
        ("$SYS/#", True), ("m/acme/c/", False),
    ],
)
def test_topics_outside_the_format(topic: str, is_filter: bool) -> None:
    assert parse_topic(topic, is_filter=is_filter) == Unsupported(raw_topic=topic)


def test_alias_lookups() -> None:
    assert alias_lookup(route("m/acme/c/Sensors")) == AliasLookup(tenant_id="", tenant_alias="acme", object_alias="sensors")
    assert alias_lookup(route(f"m/{TENANT.upper()}/c/s")) == AliasLookup(
        tenant_id=TENANT, tenant_alias="", object_alias="s"
    )
    assert alias_lookup(route(f"m/{TENANT}/c/{CHANNEL}")) is None


def test_check_context_has_exactly_the_designed_keys() -> None:
    publish = check_context(route("/m/acme/c/s/t/"), protocol="mqtt", is_filter=False)
    assert publish == {
        "protocol": "mqtt", "raw_topic": "/m/acme/c/s/t/", "topic": "m/acme/c/s/t",
        "route_tenant": "acme", "route_channel": "s", "subtopic": "t",
    }
    subscribe = check_context(route("$share/g/m/acme/c/s", is_filter=True), protocol="http", is_filter=True)
    assert subscribe["filter"] == "" and "subtopic" not in subscribe and subscribe["raw_topic"] == "$share/g/m/acme/c/s"


def test_uuids_and_ids() -> None:
    assert is_uuid(TENANT) and is_uuid(TENANT.upper())
    for value in ("acme", TENANT.replace("-", ""), "{" + TENANT + "}", TENANT + "0", f"urn:uuid:{TENANT}"):
        assert not is_uuid(value)
    assert same_id(TENANT, TENANT.upper())
    assert not same_id("", "") and not same_id(TENANT, CHANNEL)


def test_a_route_cannot_be_built_against_its_invariants() -> None:
    with pytest.raises(ValueError):
        Route(raw_topic="x", topic="x", tenant="+", channel="s", rest="")
    with pytest.raises(ValueError):
        Route(raw_topic="x", topic="x", tenant="acme", channel=CHANNEL, rest="")
    with pytest.raises(ValueError):
        Route(raw_topic="x", topic="x", tenant="", channel="s", rest="")


# -- properties ------------------------------------------------------------------------------------

_LEVELS = ["m", "c", "acme", "x", TENANT, CHANNEL, "", "$share", "g"]
_name_levels = st.lists(st.sampled_from(_LEVELS), min_size=1, max_size=7)
_filter_levels = st.lists(st.sampled_from([*_LEVELS, "+"]), min_size=1, max_size=7)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(_filter_levels)
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@st.composite
def matching_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """A topic and a filter derived from it (levels turned into `+`, a `#` tail), so they match."""
    levels = draw(_name_levels)
    levels = [""] * draw(st.integers(0, 2)) + levels + [""] * draw(st.integers(0, 1))
    wild = [("+" if draw(st.integers(0, 3)) == 0 else level) for level in levels]
    cut = draw(st.integers(0, len(wild)))
    if cut < len(wild) and draw(st.booleans()):
        wild = [*wild[:cut], "#"]
    return "/".join(levels), "/".join(wild)


def _assert_not_wider(topic_filter: str, topic: str) -> None:
    parsed_filter = parse_topic(topic_filter, is_filter=True)
    if not topic_matches(topic_filter, topic):
        return
    parsed_topic = parse_topic(topic, is_filter=False)
    if isinstance(parsed_filter, Unsupported):
        assert not isinstance(parsed_topic, Route), (topic_filter, topic, parsed_topic)
    elif isinstance(parsed_filter, Route):
        assert isinstance(parsed_topic, Route), (topic_filter, topic, parsed_topic)
        assert (parsed_topic.tenant, parsed_topic.channel) == (parsed_filter.tenant, parsed_filter.channel)


@settings(max_examples=600, deadline=None)
@given(pair=matching_pairs())
def test_a_filter_never_covers_more_than_its_answer(pair: tuple[str, str]) -> None:
    """A Route filter only matches its own channel; an Unsupported one matches no channel topic."""
    _assert_not_wider(pair[1], pair[0])


@settings(max_examples=300, deadline=None)
@given(topic_filter=topic_filters(), topic=_name_levels.map("/".join))
def test_unrelated_filters_never_cover_more_than_their_answer(topic_filter: str, topic: str) -> None:
    _assert_not_wider(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(topic_filter=topic_filters())
def test_a_wildcard_in_the_tenant_or_channel_level_is_always_refused(topic_filter: str) -> None:
    parsed = parse_topic(topic_filter, is_filter=True)
    levels = topic_filter.split("/")
    if levels[0] == "$share":
        levels = levels[2:]
    levels = "/".join(levels).strip("/").split("/")
    if len(levels) >= 4 and levels[0] == "m" and levels[2] == "c" and ({levels[1], levels[3]} & {"+", "#"}):
        assert isinstance(parsed, Refused)
    if isinstance(parsed, Route):
        assert "+" not in parsed.tenant + parsed.channel and "#" not in parsed.tenant + parsed.channel


@settings(max_examples=300, deadline=None)
@given(topic=st.text(max_size=40), is_filter=st.booleans())
def test_any_text_gets_one_of_the_three_answers(topic: str, is_filter: bool) -> None:
    parsed = parse_topic(topic, is_filter=is_filter)
    assert isinstance(parsed, Route | Unsupported | Refused)
    if isinstance(parsed, Route):
        assert parsed.topic == parsed.topic.strip("/") and parsed.raw_topic == topic
        assert check_context(parsed, protocol="mqtt", is_filter=is_filter)["route_channel"] == parsed.channel
