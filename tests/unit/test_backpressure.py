from __future__ import annotations

import asyncio

import pytest

from gateway import backpressure
from gateway.backpressure import HeldPublishers, PublisherHold


class FakePublisher:
    def __init__(self) -> None:
        self.hold = PublisherHold()

    def throttle(self, blocker: object) -> None:
        self.hold.add(blocker)  # type: ignore[arg-type]

    def unthrottle(self, blocker: object) -> None:
        self.hold.remove(blocker)  # type: ignore[arg-type]


class FakeQueue:
    def __init__(self) -> None:
        self.held = HeldPublishers(self)

    def forget_publisher(self, publisher: object) -> None:
        self.held.forget(publisher)  # type: ignore[arg-type]


async def test_publisher_waits_until_every_blocker_releases_it() -> None:
    publisher, first, second = FakePublisher(), FakeQueue(), FakeQueue()
    first.held.hold(publisher)
    first.held.hold(publisher)  # holding twice is one hold
    second.held.hold(publisher)
    assert publisher.hold
    waiter = asyncio.create_task(publisher.hold.wait(publisher, "p"))
    first.held.release_all()
    await asyncio.sleep(0)
    assert not waiter.done()
    second.held.release_all()
    await asyncio.wait_for(waiter, 1)
    assert not publisher.hold and not first.held and not second.held


async def test_hold_gives_up_after_max_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backpressure, "MAX_HOLD", 0.01)
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    await publisher.hold.wait(publisher, "p")
    assert not publisher.hold
    assert not queue.held  # the queue forgot the publisher that stopped waiting


async def test_release_on_close_tells_blockers() -> None:
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    publisher.hold.release(publisher)
    assert not queue.held and not publisher.hold
    await asyncio.wait_for(publisher.hold.wait(publisher, "p"), 1)  # nothing to wait for


async def test_held_attribute_follows_the_blockers() -> None:
    """`held` is what the MQTT hot path reads per PUBLISH instead of calling __bool__."""
    publisher, first, second = FakePublisher(), FakeQueue(), FakeQueue()
    assert not publisher.hold.held
    first.held.hold(publisher)
    second.held.hold(publisher)
    assert publisher.hold.held
    first.held.release_all()
    assert publisher.hold.held  # still held by the second queue
    second.held.release_all()
    assert not publisher.hold.held
    first.held.hold(publisher)
    publisher.hold.release(publisher)
    assert not publisher.hold.held and not publisher.hold
