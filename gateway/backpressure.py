"""Backpressure between full queues and the publishers filling them, whatever protocols they speak.

The router hands every message to the subscribers' queues together with its
publisher (`Router.publish(message, publisher)`). A queue that cannot take
more under the `block` policy (or under `reject_new` when the publisher
cannot be told "refused"), and the gateway-wide memory watermark, *hold*
that publisher: its further publishes wait (its acknowledgements keep
flowing, so two clients feeding each other cannot deadlock) until every
holder releases it. Nothing here knows a protocol: a publisher is anything
with `refusable`, `hold` and `release`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol as TypingProtocol

log = logging.getLogger("polygate.backpressure")

#: A publisher held this long is logged (once per hold), so a stuck consumer is visible.
HOLD_WARNING = 10.0


class Blocker(TypingProtocol):
    def forget_publisher(self, publisher: Publisher) -> None:
        """The publisher went away: stop tracking it."""


class Publisher(TypingProtocol):
    #: True when a refused message can be reported to this publisher for the
    #: message being routed now (AMQP nack/rejected, HTTP 503, CoAP 5.03, MQTT 5
    #: 0x97), or needs no report (nothing was promised, e.g. MQTT QoS 0). False
    #: (an MQTT 3.1.1 QoS 1/2 publish): a full `reject_new` queue takes the
    #: message anyway and holds the publisher instead of losing what it acknowledges.
    refusable: bool

    def hold(self, blocker: Blocker) -> None:
        """Hold further publishes until `release(blocker)`."""

    def release(self, blocker: Blocker) -> None: ...


class _NoPublisher:
    """For messages no client is waiting on (wills, retained replays): never held, refusal is a drop."""

    __slots__ = ()
    refusable = True

    def hold(self, blocker: Blocker) -> None:
        return None

    def release(self, blocker: Blocker) -> None:
        return None


NO_PUBLISHER: Publisher = _NoPublisher()


class _Draining:
    """Holds every publisher while the gateway stops: what arrives now is not acknowledged."""

    __slots__ = ()

    def forget_publisher(self, publisher: Publisher) -> None:
        return None


DRAINING: Blocker = _Draining()


class HeldPublishers:
    """The holder's side: the publishers one full queue (or the memory alarm) holds back."""

    __slots__ = ("_owner", "_publishers")

    def __init__(self, owner: Blocker) -> None:
        self._owner = owner
        self._publishers: set[Publisher] | None = None

    def __bool__(self) -> bool:
        return bool(self._publishers)

    def __len__(self) -> int:
        return len(self._publishers) if self._publishers else 0

    def hold(self, publisher: Publisher) -> None:
        publishers = self._publishers
        if publishers is None:
            publishers = self._publishers = set()
        if publisher not in publishers:
            publishers.add(publisher)
            publisher.hold(self._owner)

    def forget(self, publisher: Publisher) -> None:
        if self._publishers is not None:
            self._publishers.discard(publisher)

    def release_all(self) -> None:
        publishers = self._publishers
        if not publishers:
            return
        self._publishers = None
        for publisher in publishers:
            publisher.release(self._owner)


class PublisherGate:
    """The publisher's side: who holds this publisher back, and a way to wait until nobody does."""

    __slots__ = ("_blockers", "_unblocked", "held", "_since")

    def __init__(self) -> None:
        self._blockers: set[Blocker] | None = None
        self._unblocked: asyncio.Event | None = None
        #: True while at least one holder holds the publisher. A plain attribute,
        #: so the per-publish check costs no method call.
        self.held = False
        self._since = 0.0

    def __bool__(self) -> bool:
        return self.held

    def add(self, blocker: Blocker) -> None:
        if self._blockers is None:
            self._blockers = set()
            self._unblocked = asyncio.Event()
        if not self._blockers:
            self._since = asyncio.get_running_loop().time()
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

    async def wait(self, name: str) -> None:
        """Until no holder holds the publisher (it waits as long as a `block` queue stays full)."""
        if not self.held:
            return
        assert self._unblocked is not None
        try:
            async with asyncio.timeout(HOLD_WARNING):
                await self._unblocked.wait()
            return
        except TimeoutError:
            log.warning("publisher %s held for over %gs by a full queue or the memory watermark; still waiting",
                        name, HOLD_WARNING, extra={"event": "publisher_held", "publisher": name})
        await self._unblocked.wait()

    def release_all(self, publisher: Publisher) -> None:
        """The publisher goes away: every holder forgets it."""
        for blocker in list(self._blockers or ()):
            blocker.forget_publisher(publisher)
        self._blockers = None
        self.held = False
        if self._unblocked is not None:
            self._unblocked.set()
