"""Token buckets on a fake clock: exact answers, bounded memory, and the rate never exceeded."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config_types import RateConfig, RatelimitConfig
from gateway.ratelimit import KeyedLimiter, RateLimits, TokenBucket, connection_key


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- TokenBucket


def test_bucket_starts_full_then_says_how_long_to_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    assert bucket.take(2) == pytest.approx(1.0)  # a refusal consumes nothing
    clock.advance(0.5)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


def test_bucket_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    for _ in range(5):
        bucket.take()
    clock.advance(3600)
    assert [bucket.take() for _ in range(5)] == [0.0] * 5
    assert bucket.take() == pytest.approx(0.1)


def test_bucket_fractional_and_oversized_takes() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    assert bucket.take(1.5) == 0.0
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(3) == math.inf  # more than burst can never be there
    assert bucket.take(0) == 0.0
    with pytest.raises(ValueError):
        bucket.take(-1)


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.take() == 0.0
    clock.advance(-10)
    assert bucket.take() == pytest.approx(1.0)
    clock.advance(1.0)
    assert bucket.take() == pytest.approx(1.0)  # back at the old stamp: still no time has passed


def test_bucket_full() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=2, clock=clock)
    assert bucket.full()
    bucket.take()
    assert not bucket.full()
    clock.advance(0.25)
    assert bucket.full()


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1), (1, 0)])
def test_bucket_refuses_bad_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


steps = st.lists(
    st.tuples(st.floats(0, 5, allow_nan=False), st.floats(0, 4, allow_nan=False)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.01, 1000), st.integers(1, 50), steps)
def test_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int, steps: list[tuple[float, float]]) -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate, burst, clock=clock)
    grants: list[tuple[float, float]] = []  # (time, tokens) of each granted take
    for pause, n in steps:
        clock.advance(pause)
        wait = bucket.take(n)
        assert wait >= 0.0
        if wait == 0.0:
            grants.append((clock.now, n))
        else:
            assert n > 0
    # In every window, however placed, at most a full bucket plus the refill.
    for first in range(len(grants)):
        total = 0.0
        for last in range(first, len(grants)):
            total += grants[last][1]
            allowance = burst + rate * (grants[last][0] - grants[first][0])
            assert total <= allowance * (1 + 1e-9) + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 1000), st.integers(1, 50), st.floats(0.01, 50), st.floats(0, 10))
def test_bucket_wait_is_exactly_enough(rate: float, burst: int, n: float, pause: float) -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate, burst, clock=clock)
    bucket.take(burst)
    clock.advance(pause)
    wait = bucket.take(n)
    if n > burst:
        assert wait == math.inf
    elif wait > 0:
        # Waiting (a hair longer than) the answer is enough; noticeably less is not.
        clock.advance(wait * (1 - 1e-6) - 1e-9)
        assert bucket.take(n) > 0
        clock.advance(wait * 2e-6 + 2e-9)
        assert bucket.take(n) == 0.0


# --------------------------------------------------------------------------- KeyedLimiter


def test_keyed_limiter_keeps_one_bucket_per_key() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(1.0, 2, clock=clock)
    assert [limiter.take("a") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0.0
    assert len(limiter) == 2


def test_keyed_limiter_drops_refilled_buckets_as_new_keys_arrive() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(10.0, 1, clock=clock)
    for index in range(1000):
        limiter.take(f"client-{index}")
        clock.advance(0.05)  # each bucket refills 0.1 s after its take
    # Only the buckets of the last ~0.1 s survive (plus at most one not yet swept).
    assert len(limiter) <= 4
    assert "client-999" in limiter and "client-0" not in limiter


def test_keyed_limiter_keeps_busy_buckets_until_the_cap() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(0.001, 1, clock=clock, max_keys=100)
    for index in range(100):
        limiter.take(f"k{index}")
    assert len(limiter) == 100  # none has refilled: all are kept
    assert limiter.take("k0") > 0  # still limited, and k0 is now the most recently used
    limiter.take("new")
    assert len(limiter) == 100
    assert "k1" not in limiter  # the least recently used went
    assert "k0" in limiter and "new" in limiter


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1)), max_size=200), st.integers(1, 10))
def test_keyed_limiter_memory_is_bounded(events: list[tuple[int, float]], max_keys: int) -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(1.0, 3, clock=clock, max_keys=max_keys)
    for key, pause in events:
        clock.advance(pause)
        assert limiter.take(str(key)) >= 0.0
        assert len(limiter) <= max_keys


# --------------------------------------------------------------------------- RateLimits


def config(enabled: bool = True, connection: bool = True, message: bool = True) -> RatelimitConfig:
    return RatelimitConfig(
        enabled=enabled,
        connection=RateConfig(enabled=connection, rate=1.0, burst=2),
        message=RateConfig(enabled=message, rate=10.0, burst=3),
    )


def test_rate_limits_off_always_allow() -> None:
    for cfg in (config(enabled=False), config(connection=False, message=False), RatelimitConfig()):
        limits = RateLimits(cfg, clock=FakeClock())
        assert not limits.enabled
        assert all(limits.check_connection("10.0.0.1") == 0.0 for _ in range(100))
        assert all(limits.check_message("c") == 0.0 for _ in range(100))
        assert limits.new_message_bucket() is None


def test_rate_limits_connections_per_ip() -> None:
    clock = FakeClock()
    limits = RateLimits(config(message=False), clock=clock)
    assert limits.enabled
    assert [limits.check_connection("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert limits.check_connection("10.0.0.1") == pytest.approx(1.0)
    assert limits.check_connection("10.0.0.2") == 0.0
    assert limits.check_message("c") == 0.0  # message limiting is off
    assert limits.new_message_bucket() is None
    clock.advance(1.0)
    assert limits.check_connection("10.0.0.1") == 0.0


def test_rate_limits_messages_per_client() -> None:
    clock = FakeClock()
    limits = RateLimits(config(connection=False), clock=clock)
    assert [limits.check_message("a") for _ in range(3)] == [0.0] * 3
    assert limits.check_message("a") == pytest.approx(0.1)
    assert limits.check_message("b") == 0.0
    assert all(limits.check_connection("10.0.0.1") == 0.0 for _ in range(10))
    bucket = limits.new_message_bucket()
    assert bucket is not None and (bucket.rate, bucket.burst) == (10.0, 3)
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.1)
    assert limits.new_message_bucket() is not bucket


def test_ipv6_clients_share_their_64() -> None:
    limits = RateLimits(config(message=False), clock=FakeClock())
    assert limits.check_connection("2001:db8:1:2::1") == 0.0
    assert limits.check_connection("2001:db8:1:2:ffff::9") == 0.0
    assert limits.check_connection("2001:db8:1:2::abcd") > 0
    assert limits.check_connection("2001:db8:1:3::1") == 0.0


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8::1", "2001:db8::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("not-an-ip", "not-an-ip"),
        ("zz::zz", "zz::zz"),
    ],
)
def test_connection_key(ip: str, key: str) -> None:
    assert connection_key(ip) == key
