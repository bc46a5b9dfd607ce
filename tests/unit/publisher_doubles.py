"""A publisher as the router and the queues see it, for unit tests."""

from __future__ import annotations

from gateway.backpressure import Blocker, PublisherGate


class FakePublisher:
    """`refusable`, `hold`, `release` backed by a real PublisherGate (`gate.held` says whether it is held);
    a connection's `InboundFlow` in the gateway."""

    def __init__(self, refusable: bool = True) -> None:
        self.refusable = refusable
        self.gate = PublisherGate()

    def hold(self, blocker: Blocker) -> None:
        self.gate.add(blocker)

    def release(self, blocker: Blocker) -> None:
        self.gate.remove(blocker)
