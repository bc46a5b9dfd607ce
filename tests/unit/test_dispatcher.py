"""The dispatcher around a counting provider: caches, coalescing, limits, fail-closed."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest

from gateway.config_types import AuthConfig, LimitsConfig
from gateway.dispatcher import Dispatcher
from gateway.events import Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.metrics import Metrics
from tests.conftest import settle


class CountingProvider:
    def __init__(self, *, delay: float = 0.0, outcome: Outcome = Outcome.ALLOW, fail: bool = False) -> None:
        self.delay = delay
        self.outcome = outcome
        self.fail = fail
        self.authn_calls = 0
        self.authz_calls = 0
        self.gate: asyncio.Event | None = None

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.authn_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("boom")
        if event.secret.reveal() != b"right":
            return Decision.deny("bad credentials")
        return Decision(outcome=self.outcome, identity=Identity(external_id=f"ext-{event.username}"), reason="x")

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        self.authz_calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("boom")
        assert identity.external_id.startswith("ext-")
        if event.topic.startswith("ok/"):
            return Decision.allow(identity)
        return Decision.deny("not allowed")


def make(provider: CountingProvider, **auth: Any) -> Dispatcher:
    config = dataclasses.replace(AuthConfig(), **auth)
    return Dispatcher(config, limits=LimitsConfig(), metrics=Metrics(), provider=provider)  # type: ignore[arg-type]


def connect(client_id: str = "c1", secret: str = "right", username: str = "u") -> AuthEvent:
    return AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id=client_id, username=username, secret=Secret(secret))


def publish(topic: str, client_id: str = "c1", secret: str = "right") -> AuthEvent:
    return AuthEvent(protocol=Protocol.HTTP, action=Action.PUBLISH, client_id=client_id, username="u", secret=Secret(secret), topic=topic)


async def test_authn_cache_hit_and_secret_change() -> None:
    provider = CountingProvider()
    dispatcher = make(provider)
    assert (await dispatcher.decide(connect())).allowed
    assert (await dispatcher.decide(connect())).allowed
    assert provider.authn_calls == 1
    assert not (await dispatcher.decide(connect(secret="wrong"))).allowed
    assert provider.authn_calls == 2


async def test_concurrent_identical_connects_coalesce_into_one_call() -> None:
    provider = CountingProvider()
    provider.gate = asyncio.Event()
    dispatcher = make(provider)
    tasks = [asyncio.create_task(dispatcher.decide(connect())) for _ in range(200)]
    await asyncio.sleep(0)
    provider.gate.set()
    decisions = await asyncio.gather(*tasks)
    assert all(d.allowed for d in decisions)
    assert provider.authn_calls == 1
    assert dispatcher.coalesced == 199


async def test_decision_cache_and_zero_ttl() -> None:
    provider = CountingProvider()
    cached = make(provider, decision_cache_ttl=60.0)
    for _ in range(100):
        assert (await cached.decide_stateless(publish("ok/x"))).allowed
    assert provider.authz_calls == 1
    provider2 = CountingProvider()
    uncached = make(provider2, decision_cache_ttl=0.0, authn_cache_ttl=0.0)
    for _ in range(10):
        assert (await uncached.decide_stateless(publish("ok/x"))).allowed
    assert (provider2.authn_calls, provider2.authz_calls) == (10, 10)


async def test_stateless_denials_say_which_step_failed() -> None:
    dispatcher = make(CountingProvider())
    bad_credentials = await dispatcher.decide_stateless(publish("ok/x", secret="wrong"))
    assert bad_credentials.outcome is Outcome.DENY and bad_credentials.identity is None
    not_allowed = await dispatcher.decide_stateless(publish("no/x"))
    assert not_allowed.outcome is Outcome.DENY and not_allowed.identity is not None


async def test_negative_cache_off_by_default_and_on_when_set() -> None:
    provider = CountingProvider()
    dispatcher = make(provider)
    for _ in range(3):
        await dispatcher.decide_stateless(publish("no/x"))
    assert provider.authz_calls == 3
    provider2 = CountingProvider()
    negative = make(provider2, negative_cache_ttl=60.0)
    for _ in range(3):
        await negative.decide_stateless(publish("no/x"))
    assert provider2.authz_calls == 1


async def test_provider_error_and_timeout_are_unavailable_never_cached() -> None:
    failing = CountingProvider(fail=True)
    dispatcher = make(failing)
    for _ in range(2):
        decision = await dispatcher.decide(connect())
        assert decision.outcome is Outcome.UNAVAILABLE
    assert failing.authn_calls == 2  # not cached
    slow = CountingProvider(delay=5)
    dispatcher = make(slow, timeout=0.05)
    decision = await dispatcher.decide(connect())
    assert decision.outcome is Outcome.UNAVAILABLE and "did not answer" in decision.reason


async def test_admission_control_makes_misses_beyond_max_inflight_wait_their_turn() -> None:
    provider = CountingProvider()
    provider.gate = asyncio.Event()
    dispatcher = make(provider, max_inflight=10)
    tasks = [asyncio.create_task(dispatcher.decide(connect(client_id=f"c{i}"))) for i in range(50)]
    await settle(lambda: provider.authn_calls == 10)
    assert dispatcher._calls.waiting == 40
    provider.gate.set()
    decisions = await asyncio.gather(*tasks)
    assert all(d.outcome is Outcome.ALLOW for d in decisions)
    assert provider.authn_calls == 50 and dispatcher.shed == 0


async def test_admission_control_sheds_what_waits_longer_than_the_timeout() -> None:
    provider = CountingProvider()
    provider.gate = asyncio.Event()
    dispatcher = make(provider, max_inflight=2, timeout=0.05, retries=0)
    tasks = [asyncio.create_task(dispatcher.decide(connect(client_id=f"c{i}"))) for i in range(5)]
    decisions = await asyncio.gather(*tasks)
    # The two callouts time out themselves; the three in line never got a slot.
    assert provider.authn_calls == 2
    assert [d.outcome for d in decisions] == [Outcome.UNAVAILABLE] * 5
    assert dispatcher.shed == 3
    assert sum("no call slot free" in d.reason for d in decisions) == 3


async def test_session_fast_path_answers_from_cache_without_await() -> None:
    provider = CountingProvider()
    dispatcher = make(provider, decision_cache_ttl=60.0)
    event = connect()
    allowed = await dispatcher.decide(event)
    session = dispatcher.session(event, allowed.identity)  # type: ignore[arg-type]
    assert session.publish_now("ok/t") is None  # a miss must be awaited
    assert (await session.publish("ok/t")).allowed
    decision = session.publish_now("ok/t")
    assert decision is not None and decision.allowed
    assert provider.authz_calls == 1
    dispatcher.invalidate()
    assert session.publish_now("ok/t") is None


async def test_protocol_without_auth_is_not_checked() -> None:
    provider = CountingProvider()
    protocols = {p: p is not Protocol.HTTP for p in Protocol}
    dispatcher = make(provider, protocols=protocols)
    assert (await dispatcher.decide_stateless(publish("anything", secret="wrong"))).allowed
    assert provider.authn_calls == 0
    assert not (await dispatcher.decide(connect(secret="wrong"))).allowed


async def test_secrets_never_reach_logs_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    provider = CountingProvider()
    dispatcher = make(provider)
    await dispatcher.decide(connect(secret="right"))
    await dispatcher.decide(connect(secret="hunter2-secret"))
    assert "hunter2-secret" not in caplog.text
    for key in dispatcher.authn_cache._data:
        assert b"right" not in repr(key).encode()
    assert "hunter2" not in repr(connect(secret="hunter2"))


async def test_cancelled_first_caller_does_not_strand_coalesced_waiters() -> None:
    provider = CountingProvider()
    provider.gate = asyncio.Event()
    dispatcher = make(provider)
    first = asyncio.create_task(dispatcher.decide(connect()))
    await asyncio.sleep(0)
    others = [asyncio.create_task(dispatcher.decide(connect())) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    provider.gate.set()
    decisions = await asyncio.wait_for(asyncio.gather(*others), timeout=5)
    assert all(d.allowed for d in decisions)
    assert provider.authn_calls == 1


async def test_stale_if_error_serves_recent_allow_only_when_set() -> None:
    provider = CountingProvider()
    strict = make(provider, authn_cache_ttl=0.05)
    assert (await strict.decide(connect())).allowed
    await asyncio.sleep(0.08)  # let the entry expire
    provider.fail = True
    assert (await strict.decide(connect())).outcome is Outcome.UNAVAILABLE

    provider2 = CountingProvider()
    lenient = make(provider2, authn_cache_ttl=0.05, stale_if_error=60.0)
    assert (await lenient.decide(connect())).allowed
    await asyncio.sleep(0.08)
    provider2.fail = True
    assert (await lenient.decide(connect())).allowed
    assert lenient.stale_served == 1
    # A denial never turns into a stale allow.
    assert (await lenient.decide(connect(secret="wrong"))).outcome is Outcome.UNAVAILABLE
