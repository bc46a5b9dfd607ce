"""Retries and a circuit breaker around any auth provider.

Every provider that talks to a remote service (callout, atom) gets the same
resilience from outside, once, instead of a copy of its own: each attempt runs
under the per-call timeout, transport errors are retried with full-jitter
backoff, and a circuit breaker stops calling a service that keeps failing so
clients are told "unavailable" at once instead of after a timeout each.

A provider that answers in this process (`in_process_wait`, e.g. `local`)
gets none of this: its waits are its own (a password check queued behind a
flood is slow, not lost) and its store never opens the breaker.

A denial is a healthy answer: it is never retried and it resets the breaker's
failure count. Whatever happens, the caller gets a `Decision`, never an
exception, and an unavailable answer is never turned into an allow.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.config_types import CircuitBreakerConfig
from gateway.errors import ProviderUnavailable
from gateway.events import AuthEvent, Decision, Identity, Outcome
from gateway.metrics import Metrics
from gateway.providers import AuthProvider

log = logging.getLogger("polygate.resilience")

#: FluxMQ's backoff: the first retry waits up to 100 ms, doubling, capped at 1 s.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 1.0
CIRCUIT_OPEN_REASON = "auth service circuit open"


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


#: The value of `polygate_circuit_breaker_state`.
_STATE_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; its result is reported back with it.

    `generation` ties the result to the breaker state the call was let through
    in: a call that started before the breaker changed state must not move it
    again when it ends (a slow failure from before a recovery would reopen it).
    """

    generation: int
    trial: bool
    #: The breaker's count of answered calls when this one started.
    answered_before: int = 0


@dataclass(frozen=True, slots=True)
class _Failure:
    """One attempt got no answer."""

    reason: str
    retryable: bool


def backoff_delay(retry: int, random: Callable[[], float] = _random.random) -> float:
    """Full jitter: wait a uniform share of min(cap, base * 2**retry) before retry `retry` (0-based)."""
    return random() * min(BACKOFF_CAP, BACKOFF_BASE * 2**retry)


class CircuitBreaker:
    """Consecutive unavailable outcomes open it; after `open_for` a few trial calls may close it.

    "Consecutive" means: with no answer from the service in between. A failed
    call counts only if no other call got an answer since it started. Under a
    connection storm thousands of calls are in flight at once, and a handful
    of them passing the timeout while the rest are answered is load, not an
    outage: counting them would open the circuit on a healthy service and turn
    the storm into refusals for `open_for` seconds.
    """

    def __init__(
        self, config: CircuitBreakerConfig, *, name: str = "auth provider", clock: Callable[[], float] = time.monotonic
    ) -> None:
        if config.failures < 1 or config.half_open_requests < 1 or config.open_for <= 0:
            raise ValueError("circuit breaker needs failures >= 1, half_open_requests >= 1 and open_for > 0")
        self.config = config
        #: Who the breaker protects, for log lines.
        self.name = name
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._failures = 0
        self._opened_at = 0.0
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._answered = 0
        #: Times the breaker opened (for metrics and tests).
        self.opened = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.open_for:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> Permit | None:
        """A permit to call now, or None: answer unavailable without calling."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self._generation, trial=False, answered_before=self._answered)
        if state is BreakerState.HALF_OPEN and self._trials_in_flight < self.config.half_open_requests:
            self._trials_in_flight += 1
            return Permit(self._generation, trial=True, answered_before=self._answered)
        return None

    def success(self, permit: Permit) -> None:
        self._answered += 1
        if not self._settle(permit):
            return
        if self._state is BreakerState.CLOSED:
            self._failures = 0
            return
        self._trial_successes += 1
        if self._trial_successes >= self.config.half_open_requests:
            log.info("%s answers again: circuit closed", self.name)
            self._move(BreakerState.CLOSED)

    def failure(self, permit: Permit) -> None:
        if not self._settle(permit):
            return
        if self._state is BreakerState.HALF_OPEN:
            log.warning("%s still failing: circuit open again for %gs", self.name, self.config.open_for)
            self._open()
            return
        if self._answered != permit.answered_before:
            return  # the service answered others meanwhile: this one was slow, not a sign of an outage
        self._failures += 1
        if self._failures >= self.config.failures:
            log.warning(
                "%s failed %d times in a row: circuit open for %gs",
                self.name,
                self._failures,
                self.config.open_for,
            )
            self._open()

    def release(self, permit: Permit) -> None:
        """The call ended with neither answer nor failure (cancelled): give back its slot."""
        self._settle(permit)

    def _settle(self, permit: Permit) -> bool:
        """True when the permit belongs to the current state; frees a trial slot."""
        if permit.generation != self._generation:
            return False
        if permit.trial:
            self._trials_in_flight -= 1
        return True

    def _open(self) -> None:
        self._move(BreakerState.OPEN)
        self._opened_at = self._clock()
        self.opened += 1

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._failures = 0
        self._trials_in_flight = 0
        self._trial_successes = 0


class ResilientProvider:
    """An `AuthProvider` around another: per-attempt timeout, retries, circuit breaker."""

    def __init__(
        self,
        inner: AuthProvider,
        *,
        name: str,
        timeout: float,
        retries: int,
        breaker: CircuitBreakerConfig,
        metrics: Metrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
        in_process: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.inner = inner
        self.name = name
        self.timeout = timeout
        self.retries = retries
        self.breaker = CircuitBreaker(breaker, name=f"auth provider {name!r}", clock=clock)
        self._sleep = sleep
        self._random = random
        self.retried = 0
        self.short_circuited = 0
        #: Calls go straight to the provider: no timeout, no retry, no breaker (it stays closed).
        self.in_process = in_process
        # The synchronous fast path is in memory: no remote call, nothing to protect.
        # Exposed only when the inner provider has one: the dispatcher looks for it.
        authorize_now = getattr(inner, "authorize_now", None)
        if authorize_now is not None:
            self.authorize_now = authorize_now
        if metrics is not None:
            metrics.add_collector(self._collect)

    @property
    def decisions_depend_on_client_id(self) -> bool:
        return bool(getattr(self.inner, "decisions_depend_on_client_id", False))

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open"."""
        return self.breaker.state.value

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def ready(self) -> bool:
        return self.breaker.state is not BreakerState.OPEN and bool(self.inner.ready())

    async def authenticate(self, event: AuthEvent) -> Decision:
        return await self._call("authenticate", lambda: self.inner.authenticate(event))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return await self._call("authorize", lambda: self.inner.authorize(event, identity))

    # -- internals --------------------------------------------------------------------------

    async def _call(self, method: str, call: Callable[[], Awaitable[Decision]]) -> Decision:
        if self.in_process:
            result = await self._attempt(method, call, timeout=None)
            return result if isinstance(result, Decision) else Decision.unavailable(result.reason)
        permit = self.breaker.acquire()
        if permit is None:
            self.short_circuited += 1
            return Decision.unavailable(CIRCUIT_OPEN_REASON)
        try:
            decision = await self._attempts(method, call)
        except BaseException:
            # Cancelled (client gone, shutdown): says nothing about the service's health.
            self.breaker.release(permit)
            raise
        if decision.outcome is Outcome.UNAVAILABLE:
            self.breaker.failure(permit)
        else:
            self.breaker.success(permit)
        return decision

    async def _attempts(self, method: str, call: Callable[[], Awaitable[Decision]]) -> Decision:
        retry = 0
        while True:
            result = await self._attempt(method, call, timeout=self.timeout)
            if isinstance(result, Decision):
                return result
            if not result.retryable or retry >= self.retries:
                return Decision.unavailable(result.reason)
            delay = backoff_delay(retry, self._random)
            log.debug(
                "auth provider %s: %s failed (%s); retry %d of %d in %.0f ms",
                self.name, method, result.reason, retry + 1, self.retries, delay * 1000,
            )
            self.retried += 1
            retry += 1
            await self._sleep(delay)

    async def _attempt(
        self, method: str, call: Callable[[], Awaitable[Decision]], *, timeout: float | None
    ) -> Decision | _Failure:
        try:
            async with asyncio.timeout(timeout):
                decision = await call()
        except TimeoutError:
            return _Failure(f"auth service did not answer within {self.timeout:g}s", retryable=True)
        except ProviderUnavailable as exc:
            return _Failure(str(exc) or "auth service unavailable", retryable=exc.retryable)
        except Exception as exc:
            # A crashing provider is a counted failure, not a crash, and never an allow.
            # Only the type and message: a traceback's frames could show a request's values.
            log.error("auth provider %s: %s failed: %s: %s", self.name, method, type(exc).__name__, exc)
            return _Failure("auth provider error", retryable=False)
        if not isinstance(decision, Decision):
            log.error("auth provider %s: %s returned %s, not a Decision", self.name, method, type(decision).__name__)
            return _Failure("auth provider error", retryable=False)
        return decision

    def _collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily(
            "polygate_circuit_breaker_state",
            "Circuit breaker of an auth provider: 0 closed, 1 half-open, 2 open",
            labels=["provider"],
        )
        state.add_metric([self.name], _STATE_GAUGE[self.breaker.state])
        opened = CounterMetricFamily(
            "polygate_circuit_breaker_opened", "Times the circuit breaker of an auth provider opened",
            labels=["provider"],
        )
        opened.add_metric([self.name], self.breaker.opened)
        short = CounterMetricFamily(
            "polygate_circuit_breaker_rejected", "Calls answered unavailable at once by an open circuit",
            labels=["provider"],
        )
        short.add_metric([self.name], self.short_circuited)
        retried = CounterMetricFamily(
            "polygate_provider_retries", "Provider calls retried after a transport error", labels=["provider"]
        )
        retried.add_metric([self.name], self.retried)
        return [state, opened, short, retried]
