"""The inbound flow of a stream connection, its output gathering and its acknowledgement order, with fakes."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from gateway.backpressure import HeldPublishers, Publisher
from gateway.frontends import flow as flow_module
from gateway.frontends.flow import (
    BYPASS,
    ORDERED,
    PUBLISH,
    SEQUENCED,
    AckOrder,
    InboundFlow,
    Output,
    ReadPauses,
    WriteGather,
)
from gateway.message import Message
from gateway.ratelimit import TokenBucket
from gateway.store.memory import MemoryStore
from gateway.store.sqlite import SQLiteStore
from tests.unit.store_doubles import RecordingStore

KINDS = {"P": PUBLISH, "O": ORDERED, "B": BYPASS, "S": SEQUENCED}


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused = 0
        self.resumed = 0
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    def abort(self) -> None:
        self.aborted = True


class Handler:
    """Events are names whose first letter is their kind: "P1" a PUBLISH, "O1" ORDERED, "B1" BYPASS, "S1" SEQUENCED.

    `waits[name]` makes `handle` return that future (the event must be awaited); `actions[name]` runs inside handle.
    """

    def __init__(self) -> None:
        self.handled: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.waits: dict[str, asyncio.Future[None]] = {}
        self.actions: dict[str, Any] = {}
        self.output: Output | None = None

    def event_kind(self, event: str) -> int:
        return KINDS[event[0]]

    def handle(self, event: str) -> Awaitable[None] | None:
        self.handled.append(event)
        action = self.actions.get(event)
        if action is not None:
            action()
        if self.output is not None:
            self.output.write(event.encode())
        return self.waits.get(event)

    def flow_error(self, event: str, exc: Exception) -> None:
        self.errors.append((event, str(exc)))

    def publisher_name(self) -> str:
        return "fake"

    def wait_on(self, *names: str) -> None:
        loop = asyncio.get_running_loop()
        for name in names:
            self.waits[name] = loop.create_future()

    def finish(self, name: str, exc: Exception | None = None) -> None:
        future = self.waits[name]
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)


class Connection:
    """One connection's flow, output and pauses on a fake transport."""

    def __init__(self, gather: WriteGather | None = None, bucket: TokenBucket | None = None,
                 write_events: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.transport = FakeTransport()
        self.handler = Handler()
        self.output = Output(loop, gather or WriteGather())
        self.output.transport = self.transport  # type: ignore[assignment]
        self.pauses = ReadPauses(lambda: False)
        self.pauses.attach(self.transport)  # type: ignore[arg-type]
        self.flow = InboundFlow(loop, self.handler, self.output, self.pauses, bucket)
        if write_events:
            self.handler.output = self.output

    @property
    def handled(self) -> list[str]:
        return self.handler.handled


class Holder:
    """A full queue holding publishers."""

    def __init__(self) -> None:
        self.held = HeldPublishers(self)

    def forget_publisher(self, publisher: Publisher) -> None:
        self.held.forget(publisher)


async def turns(count: int = 5) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


# -- InboundFlow -------------------------------------------------------------------------------------------


async def test_events_are_handled_at_once_in_order_when_nothing_waits() -> None:
    conn = Connection()
    conn.flow.feed(["P1", "O1", "B1", "S1", "P2"])
    assert conn.handled == ["P1", "O1", "B1", "S1", "P2"]  # inside feed: no task, no await
    assert not conn.flow.busy and conn.flow._worker is None
    conn.flow.feed(["P3"])
    assert conn.handled[-1] == "P3"


async def test_an_awaited_event_makes_the_rest_wait_in_order_behind_it() -> None:
    conn = Connection()
    conn.handler.wait_on("O1")
    conn.flow.feed(["P1", "O1", "P2", "O2"])
    assert conn.handled == ["P1", "O1"] and conn.flow.busy
    conn.flow.feed(["S1", "P3"])  # a later read queues behind
    await turns()
    assert conn.handled == ["P1", "O1"]
    conn.handler.finish("O1")
    await turns()
    assert conn.handled == ["P1", "O1", "P2", "O2", "S1", "P3"]
    assert not conn.flow.busy
    conn.flow.feed(["P4"])
    assert conn.handled[-1] == "P4"  # back on the direct path


async def test_an_awaited_event_in_the_backlog_is_awaited_before_the_next() -> None:
    conn = Connection()
    conn.handler.wait_on("O1", "P2")
    conn.flow.feed(["O1", "P2", "P3"])
    conn.handler.finish("O1")
    await turns()
    assert conn.handled == ["O1", "P2"]
    conn.handler.finish("P2")
    await turns()
    assert conn.handled == ["O1", "P2", "P3"]


async def test_bypass_waits_behind_an_ordered_event_awaited_or_in_the_backlog() -> None:
    conn = Connection()
    conn.handler.wait_on("O1", "O2")
    conn.flow.feed(["O1"])  # awaited first: a barrier as if it were in the backlog
    conn.flow.feed(["B1"])
    assert conn.handled == ["O1"]  # the ack waits behind the ORDERED event being awaited
    conn.flow.feed(["O2", "P1", "B2", "B3"])
    assert conn.handled == ["O1"]
    conn.handler.finish("O1")
    await turns()
    assert conn.handled == ["O1", "B1", "O2"]  # O2 is being awaited; it still holds B2 and B3 back
    conn.handler.finish("O2")
    await turns()
    # The last ORDERED event is done: the acks go at once, ahead of P1 still in the backlog.
    assert conn.handled == ["O1", "B1", "O2", "B2", "B3", "P1"]
    assert not conn.flow.busy
    conn.flow.feed(["B4"])
    assert conn.handled[-1] == "B4"  # no barrier left: at once


async def test_bypass_behind_an_awaited_ordered_event_goes_as_soon_as_it_is_done() -> None:
    conn = Connection()
    holder = Holder()
    conn.handler.wait_on("O1")
    conn.handler.actions["O1"] = lambda: holder.held.hold(conn.flow)  # e.g. its retained messages fill a queue
    conn.flow.feed(["O1", "P1", "B1"])
    assert conn.handled == ["O1"]
    conn.handler.finish("O1")
    await turns()
    assert conn.handled == ["O1", "B1"]  # not behind P1, which waits for the holder
    assert conn.flow.held and conn.flow.busy
    holder.held.release_all()
    await turns()
    assert conn.handled == ["O1", "B1", "P1"] and not conn.flow.busy


@pytest.mark.parametrize("first", ["P1", "S1"])
async def test_bypass_runs_at_once_behind_an_awaited_event_that_is_no_barrier(first: str) -> None:
    conn = Connection()
    conn.handler.wait_on(first)
    conn.flow.feed([first, "P2", "B1"])
    assert conn.handled == [first, "B1"]
    conn.handler.finish(first)
    await turns()
    assert conn.handled == [first, "B1", "P2"] and not conn.flow.busy


async def test_an_events_kind_is_fixed_when_it_is_queued() -> None:
    """A kind may depend on state that changes meanwhile (an MQTT packet id freed by an ack)."""
    conn = Connection()
    kinds: dict[str, int] = {"X1": ORDERED}
    plain_kind = conn.handler.event_kind
    conn.handler.event_kind = lambda event: kinds[event] if event in kinds else plain_kind(event)  # type: ignore[method-assign]
    holder = Holder()
    conn.handler.wait_on("O1")
    conn.handler.actions["X1"] = lambda: holder.held.hold(conn.flow)
    conn.flow.feed(["O1", "X1", "P1", "B1"])
    kinds["X1"] = BYPASS  # after it was queued as ORDERED
    conn.handler.finish("O1")
    await turns()
    # X1 kept its place and its barrier: once it is done, B1 goes, not behind the held P1.
    assert conn.handled == ["O1", "X1", "B1"] and conn.flow.held
    holder.held.release_all()
    await turns()
    assert conn.handled == ["O1", "X1", "B1", "P1"] and not conn.flow.busy
    conn.flow.feed(["B2"])
    assert conn.handled[-1] == "B2"  # and the barrier count came back to none


async def test_bypass_goes_as_soon_as_the_last_ordered_event_is_done_not_behind_held_publishes() -> None:
    conn = Connection()
    holder = Holder()
    conn.handler.wait_on("O1")
    conn.handler.actions["O2"] = lambda: holder.held.hold(conn.flow)  # e.g. its retained messages fill a queue
    conn.flow.feed(["O1"])
    conn.flow.feed(["O2", "P1", "B1", "S1", "B2"])
    assert conn.handled == ["O1"]  # O2 waits in the backlog: so do the acks
    conn.handler.finish("O1")
    await turns()
    # O2 was the last barrier: the acks go at once, while P1 (and S1 behind it) wait for the holder.
    assert conn.handled == ["O1", "O2", "B1", "B2"]
    assert conn.flow.held and conn.flow.busy
    holder.held.release_all()
    await turns()
    assert conn.handled == ["O1", "O2", "B1", "B2", "P1", "S1"]


async def test_sequenced_waits_in_order_but_is_no_barrier() -> None:
    conn = Connection()
    conn.handler.wait_on("O1", "O2")
    conn.flow.feed(["O1"])
    conn.flow.feed(["O2", "S1", "B1"])
    assert conn.handled == ["O1"]  # O2 in the backlog holds the ack back
    conn.handler.finish("O1")
    await turns()
    conn.handler.finish("O2")
    await turns()
    assert conn.handled == ["O1", "O2", "B1", "S1"]  # the ack went first, the SEQUENCED one kept its place
    conn2 = Connection()
    conn2.handler.wait_on("P1")
    conn2.flow.feed(["P1", "S1", "B1", "S2"])
    # Only a SEQUENCED event (no ORDERED) in the backlog: the ack does not wait.
    assert conn2.handled == ["P1", "B1"]
    conn2.handler.finish("P1")
    await turns()
    assert conn2.handled == ["P1", "B1", "S1", "S2"]


async def test_publish_waits_while_held_and_continues_when_released() -> None:
    conn = Connection()
    holder = Holder()
    holder.held.hold(conn.flow)
    assert conn.flow.held
    conn.flow.feed(["P1", "B1", "O1", "P2", "B2"])
    assert conn.handled == ["B1"]  # acks are never held back by a full queue
    await turns()
    assert conn.handled == ["B1"]
    holder.held.release_all()
    await turns()
    # O1 was the last barrier: once it is done, B2 goes before P2, which is still in the backlog.
    assert conn.handled == ["B1", "P1", "O1", "B2", "P2"]
    assert not conn.flow.busy


async def test_a_publish_that_gets_the_publisher_held_holds_the_next_ones() -> None:
    conn = Connection()
    holder = Holder()
    conn.handler.actions["P1"] = lambda: holder.held.hold(conn.flow)  # the router's queue is full now
    conn.flow.feed(["P1", "P2", "B1", "P3"])
    assert conn.handled == ["P1", "B1"]
    holder.held.release_all()
    await turns()
    assert conn.handled == ["P1", "B1", "P2", "P3"]


async def test_rate_limited_publishes_wait_for_tokens_with_reading_paused() -> None:
    bucket = TokenBucket(rate=500, burst=1)  # one now, then one every 2 ms
    conn = Connection(bucket=bucket)
    conn.flow.feed(["P1", "P2", "B1", "P3"])
    assert conn.handled == ["P1", "B1"]
    await asyncio.wait_for(_until(lambda: len(conn.handled) == 4), 2)
    assert conn.handled == ["P1", "B1", "P2", "P3"]
    assert conn.transport.paused >= 1 and conn.transport.resumed == conn.transport.paused
    assert not conn.pauses


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def test_a_backlog_over_max_backlog_pauses_reading_until_it_is_worked_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flow_module, "MAX_BACKLOG", 3)
    conn = Connection()
    holder = Holder()
    holder.held.hold(conn.flow)
    conn.flow.feed(["P1", "P2", "P3"])
    assert conn.transport.paused == 0
    conn.flow.feed(["P4"])
    assert conn.transport.paused == 1 and conn.pauses
    conn.flow.feed(["P5"])
    assert conn.transport.paused == 1  # paused once
    holder.held.release_all()
    await turns(10)
    assert conn.handled == ["P1", "P2", "P3", "P4", "P5"]
    assert conn.transport.resumed == 1 and not conn.pauses


async def test_errors_go_to_the_handler_and_the_flow_goes_on() -> None:
    conn = Connection()

    def boom() -> None:
        raise RuntimeError("bad event")

    conn.handler.actions["O1"] = boom
    conn.handler.wait_on("O2")
    conn.flow.feed(["P1", "O1", "O2", "P2"])
    assert conn.handler.errors == [("O1", "bad event")]
    conn.handler.finish("O2", RuntimeError("bad answer"))
    await turns()
    assert conn.handler.errors == [("O1", "bad event"), ("O2", "bad answer")]
    assert conn.handled == ["P1", "O1", "O2", "P2"]


async def test_close_makes_every_holder_forget_the_publisher_and_stops_the_worker() -> None:
    conn = Connection()
    first, second = Holder(), Holder()
    first.held.hold(conn.flow)
    second.held.hold(conn.flow)
    conn.flow.feed(["P1", "P2"])
    await turns()
    worker = conn.flow._worker
    assert worker is not None
    conn.flow.close()
    await turns()
    assert worker.cancelled() or worker.done()
    assert not first.held and not second.held
    assert not conn.flow.held and not conn.flow.busy
    assert conn.handled == []
    first.held.hold(conn.flow)  # a queue that fills after the close does not hold it
    assert not conn.flow.held
    conn.flow.feed(["P3"])
    assert conn.handled == []  # nothing is handled after the close


async def test_close_while_an_event_is_awaited() -> None:
    conn = Connection()
    conn.handler.wait_on("O1")
    conn.flow.feed(["O1", "P1"])
    await turns()
    conn.flow.close()
    await turns()
    assert conn.handled == ["O1"] and not conn.flow.busy
    assert conn.handler.waits["O1"].cancelled()


async def _connect_step(log: list[str]) -> None:
    log.append("ran")
    await asyncio.sleep(0)


async def test_close_before_the_worker_ran_closes_the_awaited_step_and_ends_the_backlog() -> None:
    """E.g. an MQTT CONNECT followed by a malformed packet in one read: close() in the same loop turn."""
    conn = Connection()
    log: list[str] = []
    step = _connect_step(log)
    conn.handler.waits["O1"] = step  # type: ignore[assignment]
    try:
        conn.flow.feed(["O1", "P1", "B1"])
        conn.flow.close()
        await turns()
        assert log == []
        assert inspect.getcoroutinestate(step) == inspect.CORO_CLOSED, "the awaited step was left open"
        assert not conn.flow.busy
        conn.flow.feed(["B2", "P2"])
        await turns()
        assert conn.handled == ["O1"]  # nothing is handled after the close, queued before or fed after
    finally:
        step.close()


# -- Output and WriteGather --------------------------------------------------------------------------------


async def test_writes_during_a_read_are_flushed_once_at_its_end() -> None:
    conn = Connection(write_events=True)
    conn.flow.feed(["P1", "O1", "B1"])
    assert conn.transport.writes == [b"P1O1B1"]  # one transport write for the whole read
    await turns()
    assert conn.transport.writes == [b"P1O1B1"]


async def test_writes_outside_a_read_go_out_once_per_loop_turn() -> None:
    conn = Connection()
    conn.output.write(b"a")
    conn.output.write(b"b")
    assert conn.transport.writes == []
    await asyncio.sleep(0)
    assert conn.transport.writes == [b"ab"]
    conn.output.write(b"c")
    await asyncio.sleep(0)
    assert conn.transport.writes == [b"ab", b"c"]


async def test_a_worker_writes_out_what_it_gathered() -> None:
    conn = Connection(write_events=True)
    conn.handler.wait_on("O1")
    conn.flow.feed(["O1"])
    conn.flow.feed(["P1", "P2"])
    conn.handler.finish("O1")
    await turns()
    assert b"".join(conn.transport.writes) == b"O1P1P2"


async def test_before_flush_runs_at_each_flush_and_a_closing_transport_gets_nothing() -> None:
    loop = asyncio.get_running_loop()
    calls: list[int] = []
    output = Output(loop, WriteGather(), lambda: calls.append(1))
    transport = FakeTransport()
    output.transport = transport  # type: ignore[assignment]
    output.flush()
    assert calls == [1] and transport.writes == []
    output.write(b"x")
    transport.closing = True
    await asyncio.sleep(0)
    assert calls == [1, 1] and transport.writes == [] and output.buffer == []


async def test_write_gather_flushes_other_connections_at_the_end_of_a_read() -> None:
    gather = WriteGather()
    reader, other = Connection(gather), Connection(gather)
    reader.handler.actions["P1"] = lambda: other.output.write(b"delivered")
    reader.handler.actions["P2"] = lambda: other.output.write(b" twice")
    reader.flow.feed(["P1", "P2"])
    # Written while another connection read: out when that read ends, not a loop turn later.
    assert other.transport.writes == [b"delivered twice"]
    assert gather.reads == 0 and gather.pending == []
    await turns()
    assert other.transport.writes == [b"delivered twice"]


async def test_write_gather_survives_a_failing_connection() -> None:
    gather = WriteGather()
    reader, broken, fine = Connection(gather), Connection(gather), Connection(gather)

    def fail(data: bytes) -> None:
        raise OSError("gone")

    broken.transport.write = fail  # type: ignore[method-assign]
    def write_both() -> None:
        broken.output.write(b"x")
        fine.output.write(b"y")

    reader.handler.actions["P1"] = write_both
    reader.flow.feed(["P1"])
    assert broken.transport.aborted
    assert fine.transport.writes == [b"y"]


# -- AckOrder ----------------------------------------------------------------------------------------------


def test_ack_order_with_a_store_that_never_waits_sends_at_once() -> None:
    sent: list[str] = []
    acks = AckOrder(MemoryStore(), sent.append)
    acks.ack("a", True)
    acks.ack("b", False)
    assert sent == ["a", "b"] and not acks


def test_ack_order_waits_for_commits_in_arrival_order() -> None:
    store = RecordingStore(acks_wait=True)
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    acks.ack("plain", False)
    assert sent == ["plain"]  # nothing waits, nothing stored: at once
    acks.ack("stored-1", True)
    acks.ack("plain-2", False)  # needs no commit, but waits behind stored-1
    assert sent == ["plain"] and acks
    store.commit()
    assert sent == ["plain", "stored-1", "plain-2"] and not acks
    acks.ack("stored-2", True)
    store.commit()
    acks.ack("stored-3", True)  # the next batch
    acks.ack("plain-3", False)
    assert sent[-1] == "stored-2"
    store.commit()
    assert sent[-2:] == ["stored-3", "plain-3"]


def test_ack_order_releases_only_what_a_commit_covers() -> None:
    store = RecordingStore(acks_wait=True)
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    acks.ack("a", True)
    acks.ack("b", True)  # same batch
    token = store.token
    store.commit()
    assert store.token == token + 1
    acks.ack("c", True)  # next batch
    acks.ack("d", False)
    assert sent == ["a", "b"]
    assert [item for _, item in acks.waiting] == ["c", "d"]
    store.commit()
    assert sent == ["a", "b", "c", "d"]


def test_ack_order_with_a_store_that_does_not_wait_still_keeps_order() -> None:
    store = RecordingStore(acks_wait=False)  # fsync: never
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    acks.ack("a", True)
    acks.ack("b", False)
    assert sent == ["a", "b"]


@pytest.mark.parametrize("first_token", [0, 1])
def test_ack_order_waits_for_the_very_first_token_of_a_store(first_token: int) -> None:
    store = RecordingStore(acks_wait=True, first_token=first_token)
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    acks.ack("a", True)
    assert sent == []
    store.commit()
    assert sent == ["a"] and not acks


def test_ack_order_clear_forgets_what_waits() -> None:
    store = RecordingStore(acks_wait=True)
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    acks.ack("a", True)
    acks.clear()
    store.commit()
    assert sent == [] and not acks


async def test_ack_order_on_the_sqlite_store(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path), fsync="batch")
    await store.open(window=10)
    sent: list[str] = []
    acks = AckOrder(store, sent.append)
    store.put_queue("q", {})
    store.add_message("q", 1, Message("t", b"x", 1), 0)
    acks.ack("stored", True)
    acks.ack("after", False)
    assert sent == []
    await store.committed()
    await asyncio.sleep(0)
    assert sent == ["stored", "after"]
    await store.aclose()
