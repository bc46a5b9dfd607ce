"""The one flow pipeline every stream frontend (MQTT, AMQP 0.9.1, AMQP 1.0) runs its connections on.

- `admit`: rate limit per source IP and the listener's capacity, refused the same way everywhere.
- `ReadPauses`: why a connection stopped reading ("backlog", "ratelimit", ...).
- `Output`: writes gathered into one transport write per read and per loop turn;
  a connection written to during *another* connection's read is flushed when
  that read ends (`WriteGather`), not one loop turn later.
- `InboundFlow`: a connection's inbound events in arrival order. On the hot path
  they are handled inside `data_received` (no task, no await); the first one
  that needs an awaited answer, a rate-limit token, or waits because a queue or
  the memory watermark holds this publisher, starts one worker task that works
  through the rest in order. Acknowledgements never wait behind held
  publishes: they drain the queues that hold them. An `InboundFlow` *is* the
  connection's `Publisher` (gateway.backpressure) for the router.
- `AckOrder`: acknowledgements in the order their publishes arrived, each sent
  once what its publish wrote to the store is committed.
- `publish_request`: the same contract for request/response frontends (HTTP,
  CoAP): one request is one publisher, answered once its message is kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol as TypingProtocol

from gateway.backpressure import Blocker, PublisherGate
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.message import Message
from gateway.queues import REFUSED, STORED
from gateway.ratelimit import TokenBucket
from gateway.state import Connection
from gateway.store.base import Store

log = logging.getLogger("polygate.frontend")

#: Events waiting in a connection's backlog before it stops reading.
MAX_BACKLOG = 1000
#: A worker writes out what it gathered once it holds this many pieces.
FLUSH_PIECES = 64

#: How `InboundFlow` treats an event (`FlowHandler.event_kind`).
PUBLISH = 0  # waits while the publisher is held and for a rate-limit token
ORDERED = 1  # waits for whatever is before it; what follows waits for it
BYPASS = 2  # an acknowledgement: handled at once unless an ORDERED event is still waiting
SEQUENCED = 3  # waits for whatever is before it, but nothing waits for it (MQTT PUBREL)


def admit(
    ctx: FrontendContext, listener: ListenerConfig, connection: Connection, protocol: Protocol, ip: str, peer: str
) -> bool:
    """The connection limits (GatewayState.admit), then the rate limit per source IP.

    False: refused, counted, logged once per interval (never per connection); the caller closes it at once.
    """
    state = ctx.state
    reason = state.admit(listener.name, connection, ip, peer)
    if reason is None and ctx.ratelimits.check_connection(ip) > 0:
        reason = "rate_limited"
        state.unregister(listener.name, connection)
        state.note_refused(listener.name, reason, peer)
    if reason is None:
        ctx.metrics.connection_opened(protocol)
        return True
    ctx.metrics.connection_refused(protocol, reason, listener.name)
    return False


class ReadPauses:
    """Why a connection stopped reading ("backlog", "ratelimit"); it reads again when none is left."""

    __slots__ = ("_transport", "_closed", "_reasons")

    def __init__(self, closed: Callable[[], bool]) -> None:
        self._transport: asyncio.Transport | None = None
        self._closed = closed
        self._reasons: set[str] = set()

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def __bool__(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        if not self._reasons and self._transport is not None and not self._closed():
            self._transport.pause_reading()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        reasons = self._reasons
        if reason in reasons:
            reasons.discard(reason)
            if not reasons and self._transport is not None and not self._closed():
                self._transport.resume_reading()

    async def wait_for_token(self, bucket: TokenBucket | None) -> None:
        """Wait for a rate-limit token with reading paused: a flooding client is slowed, not dropped."""
        if bucket is None:
            return
        wait = bucket.take()
        if wait <= 0:
            return
        self.pause("ratelimit")
        try:
            while wait > 0 and not self._closed():
                await asyncio.sleep(wait)
                wait = bucket.take()
        finally:
            self.resume("ratelimit")


# -- output ------------------------------------------------------------------------------------------


class WriteGather:
    """Connections written to while another connection handles a read: flushed when that read ends.

    One per gateway, shared by every stream connection (reads never nest).
    """

    __slots__ = ("reads", "pending")

    def __init__(self) -> None:
        self.reads = 0
        self.pending: list[Output] = []

    def flush(self) -> None:
        pending = self.pending
        self.pending = []
        for output in pending:
            try:
                output.flush()
            except Exception:
                # Another connection's fault must not close the one whose read this is.
                log.exception("writing to a connection failed; dropping it")
                if output.transport is not None:
                    output.transport.abort()


class Output:
    """One connection's outgoing bytes, gathered: one transport write per read and per loop turn.

    `buffer` is public (and never replaced) so a hot path may append to it
    directly, as long as it calls `schedule()` when `scheduled` and `reading` are False.
    """

    __slots__ = ("loop", "transport", "buffer", "scheduled", "reading", "gather", "before_flush")

    def __init__(self, loop: asyncio.AbstractEventLoop, gather: WriteGather,
                 before_flush: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer: list[bytes] = []
        self.scheduled = False
        #: True while this connection handles a read: the read flushes at its end.
        self.reading = False
        self.gather = gather
        #: Runs at the start of every flush (e.g. to add publisher confirms, fold counters).
        self.before_flush = before_flush

    def write(self, data: bytes) -> None:
        self.buffer.append(data)
        if not self.reading and not self.scheduled:
            self.schedule()

    def schedule(self) -> None:
        self.scheduled = True
        gather = self.gather
        if gather.reads:
            gather.pending.append(self)
        else:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        if self.before_flush is not None:
            self.before_flush()
        buffer = self.buffer
        if not buffer:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(buffer[0] if len(buffer) == 1 else b"".join(buffer))
        buffer.clear()


# -- inbound ------------------------------------------------------------------------------------------


class _NoEventType:
    """Never an event's type: a handler without a publish fast path."""


class FlowHandler(TypingProtocol):
    """What a connection tells its `InboundFlow`.

    `publish_type` and `publish` are the hot path's shortcut: an event of exactly that
    type is a PUBLISH, handled by `publish(event)` without `event_kind` and `handle`.
    """

    publish_type: type

    def publish(self, event: Any) -> Awaitable[None] | None:
        """Handle a PUBLISH event (as `handle` would)."""

    def event_kind(self, event: Any) -> int:
        """PUBLISH, ORDERED, BYPASS or SEQUENCED."""

    def handle(self, event: Any) -> Awaitable[None] | None:
        """Act on one event; an awaitable when it must wait (what follows waits for it)."""

    def flow_error(self, event: Any, exc: Exception) -> None:
        """`handle` or its awaitable raised: the connection's one error boundary."""

    def publisher_name(self) -> str:
        """For log lines about a held publisher."""


class InboundFlow:
    """One connection's inbound events, in order, with as little awaiting as possible; also its `Publisher`."""

    __slots__ = (
        "loop", "handler", "output", "pauses", "gate", "bucket", "refusable", "_backlog", "_worker", "_barriers",
        "_first", "_closed", "__weakref__",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: FlowHandler, output: Output, pauses: ReadPauses,
                 bucket: TokenBucket | None) -> None:
        self.loop = loop
        self.handler = handler
        self.output = output
        self.pauses = pauses
        #: Who holds this publisher back (full queues, the memory watermark).
        self.gate = PublisherGate()
        self.bucket = bucket
        #: Publisher.refusable for the message being routed now; the connection sets it.
        self.refusable = True
        self._backlog: deque[tuple[int, Any]] | None = None
        self._worker: asyncio.Task[None] | None = None
        #: The awaitable that started the worker, until the worker takes it.
        self._first: tuple[Awaitable[None], Any, int] | None = None
        #: ORDERED events in the backlog: acknowledgements wait behind them.
        self._barriers = 0
        self._closed = False

    # -- Publisher ------------------------------------------------------------------------------

    def hold(self, blocker: Blocker) -> None:
        if not self._closed:
            self.gate.add(blocker)

    def release(self, blocker: Blocker) -> None:
        self.gate.remove(blocker)

    @property
    def held(self) -> bool:
        return self.gate.held

    @property
    def busy(self) -> bool:
        """Events are waiting (or one is being awaited)."""
        return self._backlog is not None

    # -- events in ------------------------------------------------------------------------------

    def feed(self, events: list[Any]) -> None:
        """Events decoded from one read: handled now while nothing waits, else queued in order."""
        if self._closed:
            return
        output = self.output
        gather = output.gather
        gather.reads += 1
        try:
            if self._backlog is None and not self.gate.held:
                output.reading = True
                try:
                    self._process(events)
                finally:
                    output.reading = False
            else:
                self._enqueue(events)
            output.flush()
        finally:
            gather.reads -= 1
            if not gather.reads and gather.pending:
                gather.flush()

    def _process(self, events: list[Any]) -> None:
        handler = self.handler
        bucket = self.bucket
        gate = self.gate
        publish_type = getattr(handler, "publish_type", _NoEventType)
        publish = getattr(handler, "publish", None)
        for index, event in enumerate(events):
            if self._closed:
                return
            if type(event) is publish_type:
                kind = PUBLISH
                handle = publish
            else:
                kind = handler.event_kind(event)
                handle = handler.handle
            if kind == PUBLISH and (gate.held or (bucket is not None and bucket.take() > 0)):
                # Held for a full queue or rate limited: this and the rest wait, in order.
                self._enqueue(events[index:])
                return
            try:
                step = handle(event)  # type: ignore[misc]
            except Exception as exc:
                handler.flow_error(event, exc)
                continue
            if step is not None:
                self._enqueue(events[index + 1:], first=(step, event, kind))
                return

    def _enqueue(self, events: list[Any], first: tuple[Awaitable[None], Any, int] | None = None) -> None:
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = deque()
            # An awaited ORDERED event holds acknowledgements back as one in the backlog would.
            self._barriers = 1 if first is not None and first[2] == ORDERED else 0
            self._first = first
            self._worker = self.loop.create_task(self._work())
        handler = self.handler
        for event in events:
            # The kind is fixed when the event is queued: it may depend on state that changes meanwhile.
            kind = handler.event_kind(event)
            if kind == BYPASS and not self._barriers:
                self._now(event)
                continue
            backlog.append((kind, event))
            if kind == ORDERED:
                self._barriers += 1
        if len(backlog) > MAX_BACKLOG:
            self.pauses.pause("backlog")

    def _now(self, event: Any) -> None:
        handler = self.handler
        try:
            step = handler.handle(event)
        except Exception as exc:
            handler.flow_error(event, exc)
            return
        if step is not None:  # pragma: no cover - acknowledgements never wait
            self.loop.create_task(self._guard(step, event))

    async def _guard(self, step: Awaitable[None], event: Any) -> None:
        try:
            await step
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.handler.flow_error(event, exc)

    async def _work(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        handler = self.handler
        output = self.output
        gate = self.gate
        try:
            first, self._first = self._first, None
            if first is not None:
                step, event, kind = first
                await self._guard(step, event)
                self._done_with(kind, backlog)
                output.flush()
            while backlog and not self._closed:
                kind, event = backlog.popleft()
                if kind == PUBLISH:
                    if gate.held:
                        await gate.wait(handler.publisher_name())
                    if self.bucket is not None:
                        await self.pauses.wait_for_token(self.bucket)
                    if self._closed:
                        break
                try:
                    next_step = handler.handle(event)
                except Exception as exc:
                    handler.flow_error(event, exc)
                    next_step = None
                if next_step is not None:
                    await self._guard(next_step, event)
                self._done_with(kind, backlog)
                if len(output.buffer) > FLUSH_PIECES:
                    output.flush()
            output.flush()
        finally:
            self._backlog = None
            self._worker = None
            self._barriers = 0
            self.pauses.resume("backlog")

    def _done_with(self, kind: int, backlog: deque[tuple[int, Any]]) -> None:
        """An event is done: when it was the last ORDERED one, the acknowledgements behind it go now."""
        if kind != ORDERED:
            return
        self._barriers -= 1
        if self._barriers or not backlog:
            return
        queued = list(backlog)
        if not any(kind == BYPASS for kind, _ in queued):
            return
        backlog.clear()
        for entry in queued:
            if entry[0] == BYPASS:
                self._now(entry[1])
            else:
                backlog.append(entry)

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """The connection ends: stop the worker and let every holder forget this publisher."""
        self._closed = True
        first, self._first = self._first, None
        if first is not None:
            # The worker never started: the awaitable it would have run is closed here.
            close = getattr(first[0], "close", None)
            if close is not None:
                close()
        worker = self._worker
        if worker is not None and not worker.done():
            worker.cancel()
        self._backlog = None
        self.gate.release_all(self)


# -- acknowledgements after the store ---------------------------------------------------------------


class AckOrder:
    """Acknowledgements sent in arrival order, each once its publish's store writes are committed.

    `ack(item, stored)`: `stored` says the publish wrote to the store (router
    status STORED). With nothing waiting and nothing stored, `send(item)` runs
    at once: the common path costs one call and two tests.
    """

    __slots__ = ("_store", "_send", "waiting", "_registered")

    def __init__(self, store: Store, send: Callable[[Any], None]) -> None:
        self._store = store
        self._send = send
        #: (store token, item) not sent yet; a hot path may test it before calling `ack`.
        self.waiting: deque[tuple[int, Any]] = deque()
        self._registered = -1

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def ack(self, item: Any, stored: bool) -> None:
        waiting = self.waiting
        store = self._store
        if stored and store.acks_wait:
            token = store.token
        elif waiting:
            token = waiting[-1][0]
        else:
            self._send(item)
            return
        waiting.append((token, item))
        if token != self._registered:
            self._registered = token
            store.when_committed(token, lambda: self._release(token))

    def _release(self, token: int) -> None:
        waiting = self.waiting
        send = self._send
        while waiting and waiting[0][0] <= token:
            send(waiting.popleft()[1])

    def clear(self) -> None:
        """The connection is gone: what waits is not sent (the publisher resends what it still owns)."""
        self.waiting.clear()


# -- request/response publishers ------------------------------------------------------------------------


class RequestPublisher:
    """One request (an HTTP POST, a CoAP POST) as the router's `Publisher`: refusable (a full
    reject_new queue means a 503 / 5.03); a full `block` queue or the memory watermark holds it."""

    __slots__ = ("gate",)

    refusable = True

    def __init__(self) -> None:
        self.gate = PublisherGate()

    def hold(self, blocker: Blocker) -> None:
        self.gate.add(blocker)

    def release(self, blocker: Blocker) -> None:
        self.gate.remove(blocker)


async def publish_request(ctx: FrontendContext, message: Message, protocol: Protocol, name: str) -> bool:
    """Route one request's message. True once every queue holds it (and the store committed what
    it wrote, and no queue holds the request back); False when a full queue refused it (counted)."""
    publisher = RequestPublisher()
    gate = publisher.gate
    try:
        status = ctx.router.publish(message, publisher)
        # The batch this publish wrote into, if it wrote at all.
        token = ctx.store.token
        ctx.metrics.messages_in[protocol] += 1
        if status & REFUSED:
            ctx.metrics.messages_refused[protocol] += 1
            return False
        if gate.held:
            # A full `block` queue or the memory watermark: accepted once none holds it back.
            await gate.wait(name)
        if status & STORED:
            await ctx.store.committed(token)
        return True
    finally:
        # Answered, refused, or the client went away: no holder keeps this publisher.
        gate.release_all(publisher)
