"""Token-bucket rate limits: new connections per source IP, messages and subscriptions per client.

Everything is pure arithmetic on an injected clock (monotonic by default), so
tests drive time with plain numbers. A `take` answers 0.0 (go ahead, tokens
consumed) or the seconds to wait (nothing consumed), which frontends turn into
Retry-After, a 4.29, or a slowed-down reader.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.config_types import RatelimitConfig

Clock = Callable[[], float]

#: Enough for every client of a busy gateway; beyond it the idlest key is forgotten.
DEFAULT_MAX_KEYS = 100_000


def _check_rate(rate: float, burst: int) -> None:
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number greater than 0, got {rate!r}")
    if burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst!r}")


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` tokens per second; starts full."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp", "_clock")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        _check_rate(rate, burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, n: float = 1.0) -> float:
        """0.0 and `n` tokens consumed, or the seconds until `n` would be there (nothing consumed).

        More than `burst` can never be there at once: the answer is then `math.inf`.
        """
        if n < 0:
            raise ValueError(f"cannot take a negative number of tokens ({n!r})")
        now = self._clock()
        tokens = self._tokens
        elapsed = now - self._stamp
        # A clock that steps back (only fakes do) must not drain the bucket.
        if elapsed > 0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self._stamp = now
        if tokens >= n:
            self._tokens = tokens - n
            return 0.0
        self._tokens = tokens
        if n > self.burst:
            return math.inf
        return (n - tokens) / self.rate

    def full(self, now: float | None = None) -> bool:
        """True when the bucket has refilled: it then behaves exactly like a new one."""
        if now is None:
            now = self._clock()
        return self._tokens + max(0.0, now - self._stamp) * self.rate >= self.burst

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate:g}, burst={self.burst:g}, tokens={self._tokens:.3g})"


class KeyedLimiter:
    """One bucket per key with bounded memory.

    Buckets live in least-recently-used order. Each new key first drops up to
    two refilled buckets from the idle end (a full bucket equals a new one, so
    forgetting it changes nothing), which keeps memory near the active set. At
    `max_keys` the idlest bucket goes even if not full: past that size memory
    wins over exactness, and that key merely starts over with a full bucket.
    """

    __slots__ = ("rate", "burst", "max_keys", "_clock", "_buckets")

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        _check_rate(rate, burst)
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, n: float = 1.0) -> float:
        """As `TokenBucket.take`, on the bucket of `key`."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._make_room()
            bucket = buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        else:
            buckets.move_to_end(key)
        return bucket.take(n)

    def _make_room(self) -> None:
        buckets = self._buckets
        now = self._clock()
        for _ in range(2):
            if not buckets:
                return
            oldest = next(iter(buckets.values()))
            if len(buckets) >= self.max_keys or oldest.full(now):
                buckets.popitem(last=False)
            else:
                return

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets


def connection_key(ip: str) -> str:
    """The bucket key of a source address: the IP itself, or its /64 for IPv6.

    One IPv6 host commonly holds a whole /64, so per-address buckets would not
    limit it at all. IPv4-mapped IPv6 addresses count as their IPv4 address.
    Anything that is not an IP address is used as written.
    """
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip.partition("%")[0])
    except ValueError:
        return ip
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


class RateLimits:
    """The gateway's limits as configured; every check is 0.0 when its limit is off."""

    def __init__(self, config: RatelimitConfig, clock: Clock = time.monotonic, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.config = config
        self._clock = clock
        connection, message = config.connection, config.message
        self._connections = (
            KeyedLimiter(connection.rate, connection.burst, clock=clock, max_keys=max_keys)
            if config.enabled and connection.enabled
            else None
        )
        self._messages = (
            KeyedLimiter(message.rate, message.burst, clock=clock, max_keys=max_keys)
            if config.enabled and message.enabled
            else None
        )

    @property
    def enabled(self) -> bool:
        """True when any limit is on."""
        return self._connections is not None or self._messages is not None

    def check_connection(self, ip: str) -> float:
        """A new connection (or HTTP/CoAP request) from `ip` (no port): 0.0 or seconds to wait."""
        if self._connections is None:
            return 0.0
        return self._connections.take(connection_key(ip))

    def check_message(self, client_key: str) -> float:
        """One message published by `client_key`: 0.0 or seconds to wait."""
        if self._messages is None:
            return 0.0
        return self._messages.take(client_key)

    def new_subscribe_bucket(self) -> TokenBucket | None:
        """A connection's bucket of subscriptions (one token per topic filter); None when off."""
        config = self.config
        subscribe = config.subscribe
        if not (config.enabled and subscribe.enabled):
            return None
        return TokenBucket(subscribe.rate, subscribe.burst, self._clock)

    def new_message_bucket(self) -> TokenBucket | None:
        """A bucket for a session to hold itself (saves the keyed lookup); None when off."""
        if self._messages is None:
            return None
        message = self.config.message
        return TokenBucket(message.rate, message.burst, self._clock)
