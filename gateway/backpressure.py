"""Backpressure between a congested subscriber and the connections filling it.

When a subscriber's queue passes its high-water mark while a publisher's
message is being routed, the subscriber holds that publisher: the publisher's
further PUBLISHes wait (its acks keep flowing, so two clients feeding each
other cannot deadlock) until the queue drains below low water, or until
`MAX_HOLD` passes; after that the publisher flows again and what the
subscriber cannot take is dropped and counted. Used by MQTT sessions and AMQP
0.9.1 queues alike.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol as TypingProtocol

log = logging.getLogger("polygate.backpressure")

#: The longest a publisher is held for congested subscribers.
MAX_HOLD = 10.0


class Publisher(TypingProtocol):
    def throttle(self, blocker: Blocker) -> None:
        """Hold further publishes until `unthrottle(blocker)`."""

    def unthrottle(self, blocker: Blocker) -> None: ...


class Blocker(TypingProtocol):
    def forget_publisher(self, publisher: Publisher) -> None:
        """The publisher stopped waiting (it gave up or went away)."""


class HeldPublishers:
    """The subscriber side: the publishers one congested queue holds back."""

    __slots__ = ("_owner", "_publishers")

    def __init__(self, owner: Blocker) -> None:
        self._owner = owner
        self._publishers: set[Publisher] | None = None

    def __bool__(self) -> bool:
        return bool(self._publishers)

    def hold(self, publisher: Publisher) -> None:
        publishers = self._publishers
        if publishers is None:
            publishers = self._publishers = set()
        if publisher not in publishers:
            publishers.add(publisher)
            publisher.throttle(self._owner)

    def forget(self, publisher: Publisher) -> None:
        if self._publishers is not None:
            self._publishers.discard(publisher)

    def release_all(self) -> None:
        publishers = self._publishers
        if publishers is None:
            return
        self._publishers = None
        for publisher in publishers:
            publisher.unthrottle(self._owner)


class PublisherHold:
    """The publisher side: which congested subscribers hold this connection back."""

    __slots__ = ("_blockers", "_unblocked", "held")

    def __init__(self) -> None:
        self._blockers: set[Blocker] | None = None
        self._unblocked: asyncio.Event | None = None
        #: True while at least one subscriber holds the publisher. A plain
        #: attribute, so the per-PUBLISH check costs no method call.
        self.held = False

    def __bool__(self) -> bool:
        return self.held

    def add(self, blocker: Blocker) -> None:
        if self._blockers is None:
            self._blockers = set()
            self._unblocked = asyncio.Event()
        self._blockers.add(blocker)
        self.held = True
        self._unblocked.clear()  # type: ignore[union-attr]

    def remove(self, blocker: Blocker) -> None:
        blockers = self._blockers
        if blockers:
            blockers.discard(blocker)
            if not blockers:
                self.held = False
                self._unblocked.set()  # type: ignore[union-attr]

    async def wait(self, publisher: Publisher, name: str) -> None:
        """Until no subscriber holds `publisher`, or `MAX_HOLD` has passed."""
        if not self._blockers:
            return
        assert self._unblocked is not None
        try:
            async with asyncio.timeout(MAX_HOLD):
                await self._unblocked.wait()
        except TimeoutError:
            log.warning("publisher %s held for %gs by congested subscribers; releasing it", name, MAX_HOLD,
                        extra={"event": "publisher_released", "publisher": name})
            self.release(publisher)

    def release(self, publisher: Publisher) -> None:
        """Stop being held (timeout, or the publisher's connection closed)."""
        for blocker in list(self._blockers or ()):
            blocker.forget_publisher(publisher)
        self._blockers = None
        self.held = False
        if self._unblocked is not None:
            self._unblocked.set()
