"""Bounded TTL caches for auth answers.

Entries carry their own expiry (a provider may ask for a shorter TTL, e.g. an
HTTP `Cache-Control: max-age`), with +-10% jitter so entries made together do
not expire together. A TTL of 0 disables a cache. Eviction is oldest-first.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    __slots__ = ("name", "maxsize", "ttl", "jitter", "hits", "misses", "keep_stale", "_data", "_clock", "_random")

    def __init__(
        self,
        name: str,
        *,
        maxsize: int,
        ttl: float,
        jitter: float = 0.1,
        keep_stale: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.maxsize = maxsize
        self.ttl = ttl
        self.jitter = jitter
        self.hits = 0
        self.misses = 0
        #: Expired entries are kept this long for `get_stale` (stale-if-error).
        self.keep_stale = keep_stale
        self._data: dict[K, tuple[float, V]] = {}
        self._clock = clock
        self._random = random.Random()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.maxsize > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            self.misses += 1
            return None
        expires = entry[0]
        now = self._clock()
        if expires <= now:
            if expires + self.keep_stale <= now:
                del self._data[key]
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def get_stale(self, key: K, max_age: float) -> V | None:
        """An entry that expired at most `max_age` ago (for stale-if-error), or None."""
        entry = self._data.get(key)
        if entry is None or entry[0] + max_age <= self._clock():
            return None
        return entry[1]

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        if ttl is None:
            ttl = self.ttl
        elif self.ttl > 0:
            # A provider may shorten an entry's life, never extend it past the operator's TTL.
            ttl = min(ttl, self.ttl)
        if ttl <= 0 or self.maxsize <= 0:
            return
        if self.jitter:
            ttl *= 1.0 + self._random.uniform(-self.jitter, self.jitter)
        data = self._data
        if key not in data and len(data) >= self.maxsize:
            self._evict()
        data[key] = (self._clock() + ttl, value)

    def _evict(self) -> None:
        data = self._data
        now = self._clock()
        # Drop expired entries among the oldest first; if none, the oldest one.
        for key in list(data)[: max(1, len(data) // 16)]:
            if data[key][0] + self.keep_stale <= now:
                del data[key]
        if len(data) >= self.maxsize:
            del data[next(iter(data))]

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()


def cache_metrics(caches: Callable[[], Iterable[TTLCache[object, object]]]) -> Callable[[], Iterable[Metric]]:
    """A metrics collector function exporting hits, misses and size per cache."""

    def collect() -> Iterable[Metric]:
        hits = CounterMetricFamily("polygate_auth_cache_hits", "Auth cache hits", labels=["cache"])
        misses = CounterMetricFamily("polygate_auth_cache_misses", "Auth cache misses", labels=["cache"])
        size = GaugeMetricFamily("polygate_auth_cache_size", "Entries in an auth cache", labels=["cache"])
        for cache in caches():
            hits.add_metric([cache.name], cache.hits)
            misses.add_metric([cache.name], cache.misses)
            size.add_metric([cache.name], len(cache))
        return [hits, misses, size]

    return collect
