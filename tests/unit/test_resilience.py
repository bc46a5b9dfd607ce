"""Retries, backoff and the circuit breaker of `gateway.resilience`, with a fake clock, sleep and random."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config_types import CircuitBreakerConfig
from gateway.errors import ProviderUnavailable
from gateway.events import Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.metrics import Metrics
from gateway.resilience import CIRCUIT_OPEN_REASON, CircuitBreaker, ResilientProvider, backoff_delay

PASSWORD = "correct-horse-battery"
CONNECT = AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id="c1", username="u", secret=Secret(PASSWORD))
PUBLISH = AuthEvent(protocol=Protocol.MQTT, action=Action.PUBLISH, client_id="c1", username="u", topic="a/b")
IDENTITY = Identity(external_id="u")
ALLOW = Decision.allow(IDENTITY)
DENY = Decision.deny("nope", 7)
DOWN = Decision.unavailable("service down")


def retryable(message: str = "connection refused") -> ProviderUnavailable:
    return ProviderUnavailable(message, retryable=True)


def fatal(message: str = "HTTP 500") -> ProviderUnavailable:
    return ProviderUnavailable(message, retryable=False)


class ScriptedProvider:
    """Answers from a script (a Decision, or an exception to raise), then `default`.

    `gate`, when set, holds every call until it is set, so tests can keep calls in flight.
    """

    def __init__(self, *script: Decision | BaseException, default: Decision | BaseException = ALLOW) -> None:
        self.script = list(script)
        self.default = default
        self.calls = 0
        self.in_flight = 0
        self.gate: asyncio.Event | None = None
        self.started = False
        self.closed = False
        self.is_ready = True

    async def start(self) -> None:
        self.started = True

    async def aclose(self) -> None:
        self.closed = True

    def ready(self) -> bool:
        return self.is_ready

    async def authenticate(self, event: AuthEvent) -> Decision:
        return await self._answer()

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return await self._answer()

    async def _answer(self) -> Decision:
        self.calls += 1
        self.in_flight += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            result = self.script.pop(0) if self.script else self.default
            if isinstance(result, BaseException):
                raise result
            return result
        finally:
            self.in_flight -= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, inner: Any, **kwargs: Any) -> None:
        self.sleeps: list[float] = []
        self.clock = FakeClock()
        breaker = kwargs.pop("breaker", CircuitBreakerConfig(failures=3, open_for=10.0, half_open_requests=2))
        options: dict[str, Any] = {"name": "test", "timeout": 1.0, "retries": 1, "random": lambda: 1.0}
        options.update(kwargs)
        self.inner = inner
        self.provider = ResilientProvider(inner, breaker=breaker, sleep=self._sleep, clock=self.clock, **options)

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def connect(self) -> Decision:
        return await self.provider.authenticate(CONNECT)

    async def publish(self) -> Decision:
        return await self.provider.authorize(PUBLISH, IDENTITY)


# -- retries and backoff ----------------------------------------------------------------------------


async def test_a_retryable_failure_is_retried_and_the_answer_returned() -> None:
    h = Harness(ScriptedProvider(retryable(), retryable()), retries=2)
    assert await h.connect() == ALLOW
    assert h.inner.calls == 3
    assert h.provider.retried == 2


async def test_retries_stop_at_the_configured_count() -> None:
    h = Harness(ScriptedProvider(default=retryable("connection refused")), retries=2)
    decision = await h.connect()
    assert decision.outcome is Outcome.UNAVAILABLE and decision.reason == "connection refused"
    assert h.inner.calls == 3


@pytest.mark.parametrize(
    "answer",
    [fatal(), DENY, DOWN, RuntimeError("bug")],
    ids=["non-retryable", "deny", "unavailable-decision", "crash"],
)
async def test_only_transport_errors_are_retried(answer: Decision | BaseException) -> None:
    h = Harness(ScriptedProvider(answer), retries=3)
    decision = await h.publish()
    assert h.inner.calls == 1
    assert h.sleeps == []
    if answer is DENY:
        assert decision == DENY
    else:
        assert decision.outcome is Outcome.UNAVAILABLE


async def test_zero_retries_calls_once() -> None:
    h = Harness(ScriptedProvider(retryable()), retries=0)
    assert (await h.connect()).outcome is Outcome.UNAVAILABLE
    assert h.inner.calls == 1


async def test_a_timeout_is_a_retryable_unavailable() -> None:
    inner = ScriptedProvider()
    inner.gate = asyncio.Event()  # never set: every attempt hangs
    h = Harness(inner, timeout=0.01, retries=1)
    decision = await h.connect()
    assert decision.outcome is Outcome.UNAVAILABLE
    assert "did not answer within 0.01s" in decision.reason
    assert inner.calls == 2 and inner.in_flight == 0


async def test_backoff_doubles_from_100ms_and_caps_at_1s() -> None:
    h = Harness(ScriptedProvider(default=retryable()), retries=6, random=lambda: 1.0)
    await h.connect()
    assert h.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


async def test_backoff_is_full_jitter() -> None:
    draws = iter([0.0, 0.5, 0.25])
    h = Harness(ScriptedProvider(default=retryable()), retries=3, random=lambda: next(draws))
    await h.connect()
    assert h.sleeps == pytest.approx([0.0, 0.1, 0.1])


@given(retry=st.integers(0, 40), draw=st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_stays_within_its_bounds(retry: int, draw: float) -> None:
    delay = backoff_delay(retry, lambda: draw)
    assert 0.0 <= delay <= min(1.0, 0.1 * 2**retry)


async def test_a_crash_is_logged_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    class Leaky(ScriptedProvider):
        async def authenticate(self, event: AuthEvent) -> Decision:
            raise ValueError(f"could not handle {event}")

    h = Harness(Leaky())
    with caplog.at_level(logging.DEBUG):
        decision = await h.connect()
    assert decision.outcome is Outcome.UNAVAILABLE
    assert "ValueError" in caplog.text
    assert PASSWORD not in caplog.text


async def test_a_non_decision_is_an_unavailable() -> None:
    h = Harness(ScriptedProvider("allow"))  # type: ignore[arg-type]
    assert (await h.connect()).outcome is Outcome.UNAVAILABLE


async def test_cancellation_propagates_and_is_not_a_failure() -> None:
    inner = ScriptedProvider()
    inner.gate = asyncio.Event()
    h = Harness(inner, breaker=CircuitBreakerConfig(failures=1, open_for=10.0, half_open_requests=1))
    task = asyncio.create_task(h.connect())
    while inner.in_flight == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.provider.state == "closed"


# -- the circuit breaker --------------------------------------------------------------------------


async def test_consecutive_failures_open_the_circuit_and_calls_stop() -> None:
    h = Harness(ScriptedProvider(default=DOWN))
    for _ in range(3):
        assert (await h.connect()).outcome is Outcome.UNAVAILABLE
    assert h.provider.state == "open"
    assert not h.provider.ready()
    decision = await h.publish()
    assert decision.outcome is Outcome.UNAVAILABLE and decision.reason == CIRCUIT_OPEN_REASON
    assert h.inner.calls == 3
    assert h.provider.short_circuited == 1


async def test_one_call_with_its_retries_is_one_failure() -> None:
    h = Harness(ScriptedProvider(default=retryable()), retries=4)
    await h.connect()
    await h.connect()
    assert h.inner.calls == 10
    assert h.provider.state == "closed"
    assert h.provider.breaker.consecutive_failures == 2


@pytest.mark.parametrize("healthy", [DENY, ALLOW], ids=["deny", "allow"])
async def test_a_denial_or_an_allow_resets_the_failure_count(healthy: Decision) -> None:
    h = Harness(ScriptedProvider(DOWN, retryable(), healthy, fatal(), DOWN, default=DOWN), retries=0)
    for _ in range(5):
        await h.connect()
    assert h.provider.state == "closed"
    await h.connect()
    assert h.provider.state == "open"


async def test_after_open_for_the_circuit_half_opens_and_successes_close_it() -> None:
    h = Harness(ScriptedProvider(DOWN, DOWN, DOWN))
    for _ in range(3):
        await h.connect()
    h.clock.now += 9.99
    assert h.provider.state == "open"
    h.clock.now += 0.01
    assert h.provider.state == "half_open"
    assert h.provider.ready()
    assert await h.connect() == ALLOW
    assert h.provider.state == "half_open"  # half_open_requests is 2
    assert await h.connect() == ALLOW
    assert h.provider.state == "closed"


async def test_a_failure_in_half_open_opens_the_circuit_again() -> None:
    h = Harness(ScriptedProvider(DOWN, DOWN, DOWN, ALLOW, retryable()), retries=0)
    for _ in range(3):
        await h.connect()
    h.clock.now += 10.0
    assert await h.connect() == ALLOW
    assert (await h.connect()).outcome is Outcome.UNAVAILABLE
    assert h.provider.state == "open"
    h.clock.now += 9.0
    assert (await h.connect()).reason == CIRCUIT_OPEN_REASON
    assert h.inner.calls == 5
    h.clock.now += 1.0
    assert h.provider.state == "half_open"


async def test_half_open_lets_only_the_trial_calls_through() -> None:
    inner = ScriptedProvider(DOWN, DOWN, DOWN)
    h = Harness(inner)
    for _ in range(3):
        await h.connect()
    h.clock.now += 10.0
    inner.gate = asyncio.Event()
    tasks = [asyncio.create_task(h.connect()) for _ in range(5)]
    while inner.in_flight < 2:
        await asyncio.sleep(0)
    # The three beyond half_open_requests were answered at once, without a call.
    done = [t for t in tasks if t.done()]
    assert len(done) == 3
    assert all(t.result().reason == CIRCUIT_OPEN_REASON for t in done)
    assert inner.in_flight == 2
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert sum(r == ALLOW for r in results) == 2
    assert h.provider.state == "closed"


async def test_a_cancelled_trial_gives_its_slot_back() -> None:
    inner = ScriptedProvider(DOWN)
    h = Harness(inner, breaker=CircuitBreakerConfig(failures=1, open_for=1.0, half_open_requests=1))
    await h.connect()
    h.clock.now += 1.0
    inner.gate = asyncio.Event()
    trial = asyncio.create_task(h.connect())
    while inner.in_flight == 0:
        await asyncio.sleep(0)
    assert (await h.connect()).reason == CIRCUIT_OPEN_REASON
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    inner.gate = None
    assert await h.connect() == ALLOW
    assert h.provider.state == "closed"


async def test_a_late_failure_from_before_the_circuit_opened_does_not_reopen_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(CircuitBreakerConfig(failures=2, open_for=5.0, half_open_requests=1), clock=clock)
    slow = breaker.acquire()
    assert slow is not None
    for _ in range(2):
        permit = breaker.acquire()
        assert permit is not None
        breaker.failure(permit)
    assert breaker.state.value == "open"
    clock.now += 5.0
    assert breaker.state.value == "half_open"
    breaker.failure(slow)  # began while closed: must not count against the half-open trials
    assert breaker.state.value == "half_open"
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    breaker.success(trial)
    assert breaker.state.value == "closed"


def test_failures_of_calls_that_overlapped_an_answer_do_not_open_the_circuit() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(failures=3, open_for=5.0, half_open_requests=1), clock=FakeClock())
    # A storm: many calls in flight, one answered, then the slowest few time out.
    storm = [breaker.acquire() for _ in range(10)]
    assert all(permit is not None for permit in storm)
    breaker.success(storm[0])  # type: ignore[arg-type]
    for permit in storm[1:]:
        breaker.failure(permit)  # type: ignore[arg-type]
    assert breaker.state.value == "closed" and breaker.consecutive_failures == 0
    # Calls started after the last answer that all fail are an outage.
    for _ in range(3):
        permit = breaker.acquire()
        assert permit is not None
        breaker.failure(permit)
    assert breaker.state.value == "open"


def test_a_breaker_needs_sane_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(CircuitBreakerConfig(failures=0))
    with pytest.raises(ValueError):
        CircuitBreaker(CircuitBreakerConfig(open_for=0.0))


# -- pass-through and metrics ------------------------------------------------------------------------


async def test_lifecycle_flags_and_the_fast_path_pass_through() -> None:
    class WithFastPath(ScriptedProvider):
        decisions_depend_on_client_id = True

        def authorize_now(self, action: Action, topic: str, client_id: str, identity: Identity) -> Decision | None:
            return DENY if topic == "x" else None

    inner = WithFastPath()
    h = Harness(inner)
    provider: Any = h.provider
    await provider.start()
    assert inner.started
    assert provider.decisions_depend_on_client_id is True
    assert provider.authorize_now(Action.PUBLISH, "x", "c", IDENTITY) == DENY
    inner.is_ready = False
    assert not provider.ready()
    await provider.aclose()
    assert inner.closed

    plain: Any = Harness(ScriptedProvider()).provider
    assert not hasattr(plain, "authorize_now")
    assert plain.decisions_depend_on_client_id is False


async def test_the_breaker_state_is_exported() -> None:
    metrics = Metrics()
    h = Harness(ScriptedProvider(default=retryable()), metrics=metrics, name="callout")
    text: Callable[[], str] = lambda: metrics.render().decode()
    assert 'polygate_circuit_breaker_state{provider="callout"} 0.0' in text()
    for _ in range(3):
        await h.connect()
    rendered = text()
    assert 'polygate_circuit_breaker_state{provider="callout"} 2.0' in rendered
    assert 'polygate_provider_retries_total{provider="callout"} 3.0' in rendered
    h.clock.now += 10.0
    assert 'polygate_circuit_breaker_state{provider="callout"} 1.0' in text()
