"""Holding publishers back: `HeldPublishers` (the holder's side) and `PublisherGate` (the publisher's side)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway import backpressure
from gateway.backpressure import DRAINING, NO_PUBLISHER, HeldPublishers, PublisherGate
from tests.unit.publisher_doubles import FakePublisher




class FakeQueue:
    """A holder: a full queue (or the memory alarm) with the publishers it holds back."""

    def __init__(self) -> None:
        self.held = HeldPublishers(self)

    def forget_publisher(self, publisher: backpressure.Publisher) -> None:
        self.held.forget(publisher)


async def test_publisher_waits_until_every_holder_releases_it() -> None:
    publisher, first, second = FakePublisher(), FakeQueue(), FakeQueue()
    first.held.hold(publisher)
    first.held.hold(publisher)  # holding twice is one hold
    second.held.hold(publisher)
    assert len(first.held) == 1 and len(second.held) == 1
    assert publisher.gate and publisher.gate.held
    waiter = asyncio.create_task(publisher.gate.wait("p"))
    first.held.release_all()
    await asyncio.sleep(0)
    assert not waiter.done()
    second.held.release_all()
    await asyncio.wait_for(waiter, 1)
    assert not publisher.gate and not first.held and not second.held


async def test_wait_returns_at_once_when_nothing_holds() -> None:
    gate = PublisherGate()
    await asyncio.wait_for(gate.wait("p"), 1)  # never held: no event is even made
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    queue.held.release_all()
    await asyncio.wait_for(publisher.gate.wait("p"), 1)


async def test_wait_keeps_waiting_past_hold_warning_and_logs_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No timeout any more: a publisher held by a full `block` queue waits as long as it stays full."""
    monkeypatch.setattr(backpressure, "HOLD_WARNING", 0.01)
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    with caplog.at_level(logging.WARNING, logger="polygate.backpressure"):
        waiter = asyncio.create_task(publisher.gate.wait("client-7"))
        await asyncio.sleep(0.08)  # several times HOLD_WARNING
        assert not waiter.done()
        assert publisher.gate.held and queue.held  # nobody gave up on anybody
        queue.held.release_all()
        await asyncio.wait_for(waiter, 1)
    warnings = [r for r in caplog.records if r.name == "polygate.backpressure"]
    assert len(warnings) == 1  # once per hold, not once per HOLD_WARNING
    assert warnings[0].levelno == logging.WARNING
    assert "client-7" in warnings[0].getMessage()
    assert getattr(warnings[0], "event", None) == "publisher_held"


async def test_a_short_hold_logs_nothing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(backpressure, "HOLD_WARNING", 5.0)
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    with caplog.at_level(logging.WARNING, logger="polygate.backpressure"):
        waiter = asyncio.create_task(publisher.gate.wait("p"))
        await asyncio.sleep(0)
        queue.held.release_all()
        await asyncio.wait_for(waiter, 1)
    assert not [r for r in caplog.records if r.name == "polygate.backpressure"]


async def test_release_all_on_close_tells_every_holder() -> None:
    publisher, first, second = FakePublisher(), FakeQueue(), FakeQueue()
    first.held.hold(publisher)
    second.held.hold(publisher)
    waiter = asyncio.create_task(publisher.gate.wait("p"))
    await asyncio.sleep(0)
    publisher.gate.release_all(publisher)  # the connection goes away
    await asyncio.wait_for(waiter, 1)  # a waiter is let go
    assert not first.held and not second.held and not publisher.gate
    await asyncio.wait_for(publisher.gate.wait("p"), 1)  # nothing to wait for
    # A holder that releases later does not trip over the forgotten publisher.
    first.held.release_all()
    assert not publisher.gate


async def test_held_attribute_follows_the_holders() -> None:
    """`held` is what the hot path reads per publish instead of calling __bool__."""
    publisher, first, second = FakePublisher(), FakeQueue(), FakeQueue()
    assert not publisher.gate.held
    first.held.hold(publisher)
    second.held.hold(publisher)
    assert publisher.gate.held
    first.held.release_all()
    assert publisher.gate.held  # still held by the second queue
    second.held.release_all()
    assert not publisher.gate.held
    first.held.hold(publisher)
    publisher.gate.release_all(publisher)
    assert not publisher.gate.held and not publisher.gate


async def test_a_held_again_publisher_waits_again() -> None:
    publisher, queue = FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    queue.held.release_all()
    queue.held.hold(publisher)
    waiter = asyncio.create_task(publisher.gate.wait("p"))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    queue.held.release_all()
    await asyncio.wait_for(waiter, 1)


async def test_forget_drops_a_publisher_without_releasing_it() -> None:
    publisher, other, queue = FakePublisher(), FakePublisher(), FakeQueue()
    queue.held.hold(publisher)
    queue.held.hold(other)
    queue.held.forget(publisher)
    assert len(queue.held) == 1
    queue.held.release_all()
    assert not other.gate.held
    assert publisher.gate.held  # forget is for a publisher that went away: it is not told


async def test_draining_holds_and_no_publisher_is_never_held() -> None:
    publisher = FakePublisher()
    publisher.hold(DRAINING)
    assert publisher.gate.held
    DRAINING.forget_publisher(publisher)  # a no-op holder
    publisher.release(DRAINING)
    assert not publisher.gate.held
    queue = FakeQueue()
    queue.held.hold(NO_PUBLISHER)
    NO_PUBLISHER.release(queue)
    queue.held.release_all()
    assert NO_PUBLISHER.refusable
