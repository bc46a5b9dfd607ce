from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.cache import TTLCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache("t", maxsize=10, ttl=10, jitter=0, clock=clock)
    cache.put("a", 1)
    clock.now += 9.9
    assert cache.get("a") == 1
    clock.now += 0.2
    assert cache.get("a") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_zero_ttl_disables() -> None:
    cache: TTLCache[str, int] = TTLCache("t", maxsize=10, ttl=0)
    assert not cache.enabled
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_entry_ttl_can_shorten_but_not_extend() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache("t", maxsize=10, ttl=10, jitter=0, clock=clock)
    cache.put("short", 1, ttl=2)
    cache.put("long", 2, ttl=100)
    cache.put("never", 3, ttl=0)
    clock.now += 5
    assert cache.get("short") is None
    assert cache.get("long") == 2
    assert cache.get("never") is None
    clock.now += 6
    assert cache.get("long") is None


def test_stale_entries_for_stale_if_error() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache("t", maxsize=10, ttl=1, jitter=0, clock=clock)
    cache.put("a", 1)
    clock.now += 3
    assert cache.get_stale("a", max_age=5) == 1
    assert cache.get_stale("a", max_age=1) is None


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=300), st.integers(min_value=1, max_value=20))
def test_size_never_exceeds_maxsize(keys: list[int], maxsize: int) -> None:
    cache: TTLCache[int, int] = TTLCache("t", maxsize=maxsize, ttl=60)
    for key in keys:
        cache.put(key, key)
        assert len(cache) <= maxsize
        assert cache.get(key) == key  # the newest entry is never the one evicted


@given(st.floats(min_value=0.01, max_value=1e5))
def test_jitter_stays_within_ten_percent(ttl: float) -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache("t", maxsize=10, ttl=ttl, clock=clock)
    cache.put("a", 1)
    clock.now += ttl * 0.899
    assert cache.get("a") == 1
    clock.now += ttl * 0.202
    assert cache.get("a") is None
