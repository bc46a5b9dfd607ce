"""ACL evaluation of the local provider on plain values: no store, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from auth_providers.acl import AclEntry, AllowAll, CompiledAcl, DenyAll, expand, validate_ops, validate_pattern
from gateway.errors import StoreError
from gateway.events import Decision, Outcome
from gateway.topics import topic_matches

BOTH = frozenset({"publish", "subscribe"})
PUB = frozenset({"publish"})
SUB = frozenset({"subscribe"})


def entry(pattern: str, ops: frozenset[str] = BOTH, deny: bool = False, username: str = "u") -> AclEntry:
    return AclEntry(username=username, pattern=pattern, ops=ops, deny=deny)


def acl(*entries: AclEntry, username: str = "alice", client_id: str = "dev1") -> CompiledAcl:
    return CompiledAcl(entries, username=username, client_id=client_id)


def pub(checker: CompiledAcl, topic: str) -> bool:
    return checker.check_publish(topic).allowed


def sub(checker: CompiledAcl, topic_filter: str) -> bool:
    return checker.check_subscribe(topic_filter).allowed


class TestSubscriptionCovering:
    checker = acl(entry("tenants/alice/#"))

    @pytest.mark.parametrize(
        "topic_filter",
        ["tenants/bob/#", "#", "tenants/+/x", "+/alice/x", "tenants/#", "tenants/+/#", "tenants/alicex/y"],
    )
    def test_filters_reaching_outside_the_pattern_are_denied(self, topic_filter: str) -> None:
        decision = self.checker.check_subscribe(topic_filter)
        assert decision.outcome is Outcome.DENY
        assert decision.reason == f"no ACL entry allows subscribe to {topic_filter!r}"

    @pytest.mark.parametrize(
        "topic_filter", ["tenants/alice/+/x", "tenants/alice/#", "tenants/alice", "tenants/alice/a/b", "tenants/alice/+"]
    )
    def test_filters_inside_the_pattern_are_allowed(self, topic_filter: str) -> None:
        assert sub(self.checker, topic_filter)

    def test_two_entries_together_do_not_cover_a_wider_filter(self) -> None:
        # `a/x` and `a/y` together do not allow `a/+`: one entry must cover the whole filter.
        checker = acl(entry("a/x"), entry("a/y"))
        assert sub(checker, "a/x") and sub(checker, "a/y")
        assert not sub(checker, "a/+")

    def test_hash_pattern_does_not_cover_dollar_topics(self) -> None:
        checker = acl(entry("#"))
        assert sub(checker, "a/b/#")
        assert not sub(checker, "$SYS/#")
        assert not pub(checker, "$SYS/x")


class TestPlaceholders:
    def test_username_placeholder_scopes_to_own_tree(self) -> None:
        checker = acl(entry("tenants/%u/#"), username="alice")
        assert pub(checker, "tenants/alice/x")
        assert sub(checker, "tenants/alice/#")
        assert sub(checker, "tenants/alice/+/x")
        assert not pub(checker, "tenants/bob/x")
        assert not sub(checker, "tenants/bob/#")
        assert not sub(checker, "tenants/+/x")
        assert not sub(checker, "#")

    def test_client_id_placeholder(self) -> None:
        checker = acl(entry("devices/%c/up", PUB), client_id="dev1")
        assert pub(checker, "devices/dev1/up")
        assert not pub(checker, "devices/dev2/up")
        assert not sub(checker, "devices/dev1/up")

    @pytest.mark.parametrize("client_id", ["", "a/b", "+", "#", "x+", "a#", "/", "$SYS"])
    def test_unusable_client_id_never_widens_an_allow(self, client_id: str) -> None:
        checker = acl(entry("devices/%c/#"), entry("%c/#"), client_id=client_id)
        for topic in ("devices/a/b", "devices/x", "devices/a", "a/b", "$SYS/broker", "devices//x", "x/y"):
            assert not pub(checker, topic), topic
        for topic_filter in ("devices/+/#", "devices/#", "#", "+/#", "$SYS/#", "devices/a/b/#"):
            assert not sub(checker, topic_filter), topic_filter

    def test_empty_username_never_matches(self) -> None:
        checker = acl(entry("users/%u/#"), entry("public/#"), username="")
        assert not pub(checker, "users//x")
        assert not pub(checker, "users/x")
        assert pub(checker, "public/x")

    def test_unusable_value_in_a_deny_forbids_the_whole_level(self) -> None:
        # Dropping the deny would widen the client's rights just as much as widening an allow.
        checker = acl(entry("devices/#"), entry("devices/%c/secret", deny=True), client_id="a/b")
        assert not pub(checker, "devices/x/secret")
        assert not sub(checker, "devices/+/secret")
        assert pub(checker, "devices/x/public")

    def test_usable_value_in_a_deny_denies_only_that_value(self) -> None:
        checker = acl(entry("devices/#"), entry("devices/%c/secret", deny=True), client_id="dev1")
        assert not pub(checker, "devices/dev1/secret")
        assert pub(checker, "devices/dev2/secret")

    def test_expand(self) -> None:
        assert expand("a/%u/%c", username="u", client_id="c", deny=False) == "a/u/c"
        assert expand("a/%u/b", username="", client_id="c", deny=False) is None
        assert expand("a/%u/b", username="", client_id="c", deny=True) == "a/+/b"
        assert expand("a%u/b", username="u", client_id="c", deny=False) == "a%u/b"
        assert expand("plain/#", username="", client_id="", deny=False) == "plain/#"

    @given(
        value=st.text(alphabet=st.sampled_from("ab/+#$"), max_size=4),
        topic=st.lists(st.text(alphabet="ab$", max_size=2), min_size=1, max_size=4).map("/".join),
    )
    def test_any_unusable_value_grants_nothing(self, value: str, topic: str) -> None:
        checker = acl(entry("%c/#"), entry("x/%u"), username=value, client_id=value)
        usable = bool(value) and not any(c in value for c in "/+#") and not value.startswith("$")
        if not usable:
            assert not pub(checker, topic)
            assert not sub(checker, topic)
        else:
            expected = topic_matches(f"{value}/#", topic) or topic == f"x/{value}"
            assert pub(checker, topic) is expected


class TestDenyOverridesAllow:
    def test_publish(self) -> None:
        checker = acl(entry("a/#"), entry("a/secret/#", PUB, deny=True))
        assert pub(checker, "a/x")
        decision = checker.check_publish("a/secret/k")
        assert decision.outcome is Outcome.DENY
        assert decision.reason == "a deny ACL entry forbids publish on 'a/secret/k'"
        # The deny was for publish only.
        assert sub(checker, "a/secret/k")

    def test_subscribe_filter_that_could_reach_a_denied_topic_is_narrowed(self) -> None:
        """A deny that covers part of a filter no longer refuses it: it becomes an exclusion."""
        checker = acl(entry("a/#"), entry("a/secret", SUB, deny=True))
        assert checker.check_subscribe("a/public/#") == Decision.allow()  # no intersection: no exclusions
        for topic_filter in ("a/#", "a/+", "a/+/#"):
            decision = checker.check_subscribe(topic_filter)
            assert decision.allowed, topic_filter
            assert decision.exclusions == ("a/secret",), topic_filter
        decision = checker.check_subscribe("a/secret")
        assert decision.outcome is Outcome.DENY
        assert decision.reason == "a deny ACL entry forbids subscribe to 'a/secret'"
        assert decision.exclusions == ()
        assert pub(checker, "a/secret")  # the deny was for subscribe only

    def test_readme_example_tenant_secrets(self) -> None:
        checker = acl(entry("tenants/alice/#"), entry("tenants/alice/secrets/#", SUB, deny=True))
        decision = checker.check_subscribe("tenants/alice/#")
        assert decision.allowed
        assert decision.exclusions == ("tenants/alice/secrets/#",)
        for denied in ("tenants/alice/secrets/#", "tenants/alice/secrets/x", "tenants/alice/secrets",
                       "tenants/alice/secrets/+/y"):
            decision = checker.check_subscribe(denied)
            assert decision.outcome is Outcome.DENY, denied
            assert decision.reason == f"a deny ACL entry forbids subscribe to {denied!r}"
        assert checker.check_subscribe("tenants/alice/public/#") == Decision.allow()
        decision = checker.check_subscribe("tenants/alice/+/x")
        assert decision.allowed and decision.exclusions == ("tenants/alice/secrets/#",)
        # Outside the allow entry it is still "no entry allows", whatever the deny.
        assert not sub(checker, "tenants/#")

    def test_paho_interop_nosubscribe(self) -> None:
        """The Paho interoperability suite: everything allowed but subscribing to `test/nosubscribe`."""
        checker = acl(entry("#"), entry("test/nosubscribe", SUB, deny=True))
        decision = checker.check_subscribe("#")
        assert decision.allowed and decision.exclusions == ("test/nosubscribe",)
        assert not sub(checker, "test/nosubscribe")
        decision = checker.check_subscribe("test/+")
        assert decision.allowed and decision.exclusions == ("test/nosubscribe",)
        decision = checker.check_subscribe("test/#")
        assert decision.allowed and decision.exclusions == ("test/nosubscribe",)
        assert checker.check_subscribe("test/other") == Decision.allow()
        assert checker.check_subscribe("+/+/x") == Decision.allow()  # one level too deep to reach it
        assert pub(checker, "test/nosubscribe")

    def test_exclusions_are_every_intersecting_deny_sorted(self) -> None:
        checker = acl(
            entry("#"),
            entry("z/secret", SUB, deny=True),
            entry("a/+/private", SUB, deny=True),
            entry("a/b/#", SUB, deny=True),
            entry("elsewhere/#", SUB, deny=True),
            entry("a/x", PUB, deny=True),  # a publish deny never narrows a subscription
        )
        decision = checker.check_subscribe("a/+/+")
        assert decision.allowed
        assert decision.exclusions == ("a/+/private", "a/b/#")
        decision = checker.check_subscribe("#")
        assert decision.exclusions == ("a/+/private", "a/b/#", "elsewhere/#", "z/secret")

    def test_a_deny_covering_the_whole_filter_wins_over_any_allow(self) -> None:
        checker = acl(entry("a/#"), entry("a/b/c"), entry("a/+/c", SUB, deny=True))
        assert not sub(checker, "a/b/c")
        assert not sub(checker, "a/+/c")
        decision = checker.check_subscribe("a/+/+")
        assert decision.allowed and decision.exclusions == ("a/+/c",)

    def test_dollar_deny_does_not_narrow_a_leading_wildcard(self) -> None:
        checker = acl(entry("#"), entry("$SYS/#", SUB, deny=True))
        assert checker.check_subscribe("#") == Decision.allow()  # `#` never reaches `$SYS` anyway

    def test_exact_allow_and_exact_deny(self) -> None:
        checker = acl(entry("a/b"), entry("a/b", deny=True))
        assert not pub(checker, "a/b")
        assert not sub(checker, "a/b")


class TestMisc:
    def test_nothing_granted_means_denied_with_reason(self) -> None:
        decision = acl().check_publish("x")
        assert decision.outcome is Outcome.DENY
        assert decision.reason == "no ACL entry allows publish on 'x'"

    def test_ops_are_separate(self) -> None:
        checker = acl(entry("p/#", PUB), entry("s/#", SUB))
        assert pub(checker, "p/1") and not sub(checker, "p/1")
        assert sub(checker, "s/1") and not pub(checker, "s/1")

    def test_allow_all_and_deny_all(self) -> None:
        assert AllowAll().check_publish("$SYS/x").allowed
        assert AllowAll().check_subscribe("#").allowed
        assert DenyAll("gone").check_publish("a").reason == "gone"
        assert not DenyAll("gone").check_subscribe("a").allowed

    @pytest.mark.parametrize("pattern", ["a/%u/#", "%c", "+/x/#", "#", "a/b", "a/%u/%c"])
    def test_valid_patterns(self, pattern: str) -> None:
        validate_pattern(pattern)

    @pytest.mark.parametrize("pattern", ["", "a/#/b", "a+/x", "a/b#", "a/x%u/b", "%u%c", "a\x00b"])
    def test_invalid_patterns(self, pattern: str) -> None:
        with pytest.raises(StoreError, match="ACL pattern"):
            validate_pattern(pattern)

    def test_ops_validation(self) -> None:
        assert validate_ops(["publish"]) == PUB
        with pytest.raises(StoreError, match="at least one"):
            validate_ops([])
        with pytest.raises(StoreError, match="unknown ACL operation read"):
            validate_ops(["read", "publish"])
        with pytest.raises(StoreError):
            AclEntry(username="u", pattern="a", ops=frozenset({"write"}))


_pattern_levels = st.lists(st.sampled_from(["a", "b", "$x", "+", ""]), min_size=1, max_size=4)
_patterns = st.builds(
    lambda levels, hash_tail: "/".join([*levels, "#"]) if hash_tail else "/".join(levels),
    _pattern_levels,
    st.booleans(),
) | st.just("#")
_topics = st.lists(st.sampled_from(["a", "b", "$x", "c", ""]), min_size=1, max_size=5).map("/".join)


@settings(max_examples=500)
@given(patterns=st.lists(_patterns, max_size=5), topic=_topics)
@example(patterns=["+"], topic="$x")
@example(patterns=["+/a"], topic="$x/a")
@example(patterns=["#"], topic="$x/a")
@example(patterns=["a/#"], topic="a")
@example(patterns=["a/+"], topic="a/")
def test_publish_matching_agrees_with_topic_matches(patterns: list[str], topic: str) -> None:
    allow_only = acl(*(entry(p, PUB) for p in patterns))
    assert pub(allow_only, topic) is any(topic_matches(p, topic) for p in patterns)
    deny_all_of_them = acl(entry("#", PUB), entry("$x/#", PUB), *(entry(p, PUB, deny=True) for p in patterns))
    denied = any(topic_matches(p, topic) for p in patterns)
    assert pub(deny_all_of_them, topic) is (not denied)


_filters = _patterns


@settings(max_examples=200, deadline=None)
@given(
    allows=st.lists(_patterns, max_size=3),
    denies=st.lists(_patterns, max_size=3),
    topic_filter=_filters,
    topics=st.lists(_topics, min_size=1, max_size=6),
)
@example(allows=["#"], denies=["test/nosubscribe"], topic_filter="#", topics=["test/nosubscribe"])
@example(allows=["a/#"], denies=["a/b/#"], topic_filter="a/#", topics=["a/b", "a/b/c", "a"])
@example(allows=["#"], denies=["+/a"], topic_filter="+/+", topics=["$x/a", "b/a"])
def test_a_granted_subscription_minus_its_exclusions_never_reaches_a_denied_topic(
    allows: list[str], denies: list[str], topic_filter: str, topics: list[str]
) -> None:
    checker = acl(*(entry(p, SUB) for p in allows), *(entry(p, SUB, deny=True) for p in denies))
    decision = checker.check_subscribe(topic_filter)
    if not decision.allowed:
        assert decision.exclusions == ()
        return
    assert list(decision.exclusions) == sorted(set(decision.exclusions))
    assert set(decision.exclusions) <= set(denies)
    for topic in topics:
        if not topic_matches(topic_filter, topic):
            continue
        excluded = any(topic_matches(e, topic) for e in decision.exclusions)
        denied = any(topic_matches(d, topic) for d in denies)
        # Every topic the filter reaches is allowed by some entry (one entry covers the filter) ...
        assert any(topic_matches(a, topic) for a in allows)
        # ... and a denied one is always excluded (and only denied ones are).
        assert excluded is denied, (topic, decision.exclusions)
