"""The embedded SQLite store in a temporary directory: batches, commits, paging reads, restarts, the lock."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from gateway.amqp091.broker import AMQPMessage
from gateway.amqp091.framing import PROPERTIES_PERSISTENT, exchange_and_key
from gateway.errors import StorageError
from gateway.events import Protocol
from gateway.message import Message
from gateway.metrics import Metrics
from gateway.queues import DROP_OLDEST, STORED, MemoryBudget, MessageQueue, QueueLimits
from gateway.store import open_store
from gateway.store.base import Snapshot, StoredEntry, decode_message, encode_message, register_message_type
from gateway.store.memory import MemoryStore
from gateway.store import sqlite as sqlite_store
from gateway.store.sqlite import DB_NAME, MAX_SEQ, SQLiteStore
from gateway.config_types import StorageConfig

WINDOW = 100


async def opened(path: Path | str, *, fsync: str = "batch", window: int = WINDOW) -> tuple[SQLiteStore, Snapshot]:
    store = SQLiteStore(str(path), fsync=fsync)
    snapshot = await store.open(window=window)
    return store, snapshot


async def read(store: SQLiteStore, key: str, after_seq: int = 0, limit: int = 1000) -> list[StoredEntry]:
    got: asyncio.Future[list[StoredEntry]] = asyncio.get_running_loop().create_future()
    store.read_messages(key, after_seq, limit, got.set_result)
    return await asyncio.wait_for(got, 5)


def m(payload: str, qos: int = 1, topic: str = "t") -> Message:
    return Message(topic, payload.encode(), qos)


def rows_on_disk(path: Path) -> int:
    """Messages a separate reader sees in the database file (what survives a kill -9)."""
    conn = sqlite3.connect(str(path / DB_NAME))
    try:
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


# -- opening, closing, the lock ---------------------------------------------------------------------------


def test_bad_fsync_is_refused() -> None:
    with pytest.raises(ValueError, match="fsync"):
        SQLiteStore("/nonexistent", fsync="sometimes")


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(StorageConfig(backend="memory")), MemoryStore)
    store = open_store(StorageConfig(backend="sqlite", path=str(tmp_path), fsync="always"))
    assert isinstance(store, SQLiteStore) and store.fsync == "always" and store.acks_wait and store.durable


async def test_queue_meta_round_trips_across_close_and_open(tmp_path: Path) -> None:
    store, snapshot = await opened(tmp_path)
    assert snapshot.queues == {} and snapshot.retained == []
    store.put_queue("mqtt:c1", {"kind": "mqtt", "subscriptions": {"a/#": [1, ["a/x"]]}, "expires_at": None})
    store.put_queue("amqp091:q", {"kind": "amqp091", "name": "q"})
    store.put_queue("mqtt:c1", {"kind": "mqtt", "subscriptions": {}, "expires_at": 12.5})  # replaced
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    assert set(snapshot.queues) == {"mqtt:c1", "amqp091:q"}
    assert snapshot.queues["mqtt:c1"].meta == {"kind": "mqtt", "subscriptions": {}, "expires_at": 12.5}
    assert [q.key for q in snapshot.queues_of("mqtt:")] == ["mqtt:c1"]
    assert [q.key for q in snapshot.queues_of("amqp091:")] == ["amqp091:q"]
    assert snapshot.queues["amqp091:q"].count == 0 and snapshot.queues["amqp091:q"].last_seq == 0
    await store.aclose()
    await store.aclose()  # twice is harmless


async def test_the_directory_lock_refuses_a_second_store(tmp_path: Path) -> None:
    first, _ = await opened(tmp_path)
    second = SQLiteStore(str(tmp_path))
    with pytest.raises(StorageError) as info:
        await second.open(window=WINDOW)
    assert "storage.path" in str(info.value) and str(tmp_path) in str(info.value)
    assert "in use" in str(info.value)
    await first.aclose()
    third, _ = await opened(tmp_path)  # released on close
    await third.aclose()


async def test_an_unusable_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="storage.path"):
        await SQLiteStore(str(blocker / "sub")).open(window=WINDOW)


# -- messages ---------------------------------------------------------------------------------------------


async def test_add_remove_and_read_keep_seq_order(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    store.put_queue("other", {})
    for seq in (5, 1, 3, 2, 4):
        store.add_message("q", seq, m(f"m{seq}"), seq * 10)
    store.add_message("other", 1, m("other"), 0)
    await store.committed()
    store.remove_message("q", 3)
    entries = await read(store, "q")
    assert [(seq, msg.payload, meta) for seq, msg, meta in entries] == [
        (1, b"m1", 10), (2, b"m2", 20), (4, b"m4", 40), (5, b"m5", 50)]
    assert [seq for seq, _, _ in await read(store, "q", after_seq=2, limit=2)] == [4, 5]
    assert await read(store, "q", after_seq=5) == []
    assert [msg.payload for _, msg, _ in await read(store, "other")] == [b"other"]
    assert await read(store, "never") == []
    store.remove_message("never", 1)  # unknown queue: nothing to do
    await store.aclose()


async def test_a_read_sees_every_write_made_before_it(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    store.add_message("q", 1, m("a"), 0)
    store.add_message("q", 2, m("b"), 0)
    got: list[list[int]] = []
    store.read_messages("q", 0, 10, lambda entries: got.append([seq for seq, _, _ in entries]))
    store.add_message("q", 3, m("c"), 0)  # after the read: not in its answer
    await store.committed()
    await asyncio.sleep(0)
    assert got == [[1, 2]]
    await store.aclose()


async def test_the_head_of_each_queue_and_its_count_come_back_at_open(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {"n": 1})
    for seq in range(1, 8):
        store.add_message("q", seq, m(str(seq), qos=seq % 3, topic=f"t/{seq}"), seq)
    store.remove_message("q", 7)
    await store.aclose()
    store, snapshot = await opened(tmp_path, window=3)
    queue = snapshot.queues["q"]
    assert queue.count == 6 and queue.last_seq == 6
    assert [(seq, msg, meta) for seq, msg, meta in queue.head] == [
        (1, Message("t/1", b"1", 1), 1), (2, Message("t/2", b"2", 2), 2), (3, Message("t/3", b"3", 0), 3)]
    await store.aclose()


async def test_a_remove_of_an_add_in_the_open_batch_writes_nothing(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    await store.committed()
    written = store.rows_written
    store.add_message("q", 1, m("acked at once"), 0)
    store.add_message("q", 2, m("kept"), 0)
    store.remove_message("q", 1)  # delivered and acknowledged before the batch was handed over
    assert store.writes_cancelled == 1
    await store.committed()
    assert store.rows_written == written + 1
    assert [seq for seq, _, _ in await read(store, "q")] == [2]
    # Once written, a remove is a real delete.
    store.remove_message("q", 2)
    await store.committed()
    assert store.writes_cancelled == 1 and await read(store, "q") == []
    assert rows_on_disk(tmp_path) == 0
    await store.aclose()


async def _idle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_a_batch_waits_for_acknowledgements_only_while_consumers_acknowledge_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wait far longer than a few turns of the loop (which is all a batch that does not wait takes).
    monkeypatch.setattr(sqlite_store, "GATHER", 1.0)
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    # Nobody acknowledges: each batch is handed over at once.
    store.add_message("q", 1, m("1"), 0)
    await asyncio.wait_for(store.committed(), 0.5)
    # A consumer acknowledges what was written a moment ago: that write could have been saved...
    store.remove_message("q", 1)
    await asyncio.wait_for(store.committed(), 0.5)
    # ...so the next batch waits for acknowledgements,
    token = store.token
    store.add_message("q", 2, m("2"), 0)
    store.add_message("q", 3, m("3"), 0)
    await _idle()
    assert store._committed < token
    store.remove_message("q", 2)
    await _idle()
    assert store._committed < token
    # and is committed at once when none of its writes is left: what waited on it need not wait longer.
    store.remove_message("q", 3)
    await asyncio.wait_for(store.committed(token), 0.5)
    assert store.writes_cancelled == 2 and rows_on_disk(tmp_path) == 0
    # That batch had quick acknowledgements: the next one waits too (GATHER, then it is written)...
    token = store.token
    store.add_message("q", 4, m("4"), 0)
    await _idle()
    assert store._committed < token
    await asyncio.wait_for(store.committed(token), 5)
    assert rows_on_disk(tmp_path) == 1
    # ...and, nothing acknowledged quickly meanwhile, the one after it is handed over at once again.
    store.add_message("q", 5, m("5"), 0)
    await asyncio.wait_for(store.committed(), 0.5)
    assert rows_on_disk(tmp_path) == 2
    await store.aclose()


async def test_consecutive_removes_delete_exactly_their_rows(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    store.put_queue("r", {})
    for seq in range(1, 11):
        store.add_message("q", seq, m(f"q{seq}"), 0)
        store.add_message("r", seq, m(f"r{seq}"), 0)
    await store.committed()
    for seq in (3, 2, 4, 5, 7, 9, 10):
        store.remove_message("q", seq)
    await store.committed()
    assert [seq for seq, _, _ in await read(store, "q")] == [1, 6, 8]
    assert [seq for seq, _, _ in await read(store, "r")] == list(range(1, 11))
    await store.aclose()


@given(st.lists(st.integers(0, 40), min_size=1))
def test_runs_cover_exactly_the_rowids(rowids: list[int]) -> None:
    singles, runs = sqlite_store._runs(rowids)
    covered = [rowid for (rowid,) in singles] + [r for first, last in runs for r in range(first, last + 1)]
    assert sorted(covered) == sorted(set(rowids))
    assert all(last > first for first, last in runs)
    # Maximal runs: no two pieces touch.
    pieces = sorted([(rowid, rowid) for (rowid,) in singles] + runs)
    assert all(b[0] > a[1] + 1 for a, b in zip(pieces, pieces[1:]))


async def test_when_committed_runs_after_the_commit(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path, fsync="batch")
    assert store.acks_wait
    store.put_queue("q", {})
    token = store.token
    store.add_message("q", 1, m("x"), 0)
    seen: list[int] = []
    store.when_committed(token, lambda: seen.append(rows_on_disk(tmp_path)))
    assert seen == []  # never at once while the batch is open
    commits = store.commits
    await store.committed(token)
    assert seen == [1]  # the row was on disk (readable by another connection) when it ran
    assert store.commits > commits
    later: list[str] = []
    store.when_committed(token, lambda: later.append("now"))
    assert later == ["now"]  # an already committed token: at once
    await store.aclose()


async def test_when_committed_keeps_order_across_batches(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path, fsync="always")
    store.put_queue("q", {})
    order: list[int] = []
    tokens = []
    for seq in range(1, 6):
        tokens.append(store.token)
        store.add_message("q", seq, m(str(seq)), 0)
        store.when_committed(store.token, functools.partial(order.append, seq))
        await asyncio.sleep(0)  # let batches be handed over in between
    await store.committed()
    assert order == [1, 2, 3, 4, 5]
    assert tokens == sorted(tokens)
    await store.aclose()


async def test_with_fsync_never_acknowledgements_do_not_wait(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path, fsync="never")
    assert not store.acks_wait
    store.put_queue("q", {})
    store.add_message("q", 1, m("x"), 0)
    seen: list[str] = []
    store.when_committed(store.token, lambda: seen.append("at once"))
    assert seen == ["at once"]
    await store.aclose()  # what was pending is still committed on close
    store, snapshot = await opened(tmp_path)
    assert snapshot.queues["q"].count == 1
    await store.aclose()


async def test_delete_queue_removes_its_rows_also_adds_still_in_the_open_batch(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("gone", {})
    store.put_queue("kept", {})
    store.add_message("gone", 1, m("committed"), 0)
    store.add_message("kept", 1, m("kept"), 0)
    await store.committed()
    written = store.rows_written
    store.add_message("gone", 2, m("open batch"), 0)
    store.delete_queue("gone")
    await store.committed()
    assert store.rows_written == written  # the add in the open batch was never written
    assert await read(store, "gone") == []
    store.delete_queue("gone")  # again: nothing to do
    # The queue number is free again: a new queue that gets it sees none of the old rows.
    store.put_queue("new", {})
    store.add_message("new", 5, m("fresh"), 0)
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    assert set(snapshot.queues) == {"kept", "new"}
    assert [msg.payload for _, msg, _ in snapshot.queues["new"].head] == [b"fresh"]
    assert [msg.payload for _, msg, _ in snapshot.queues["kept"].head] == [b"kept"]
    assert rows_on_disk(tmp_path) == 2
    await store.aclose()


async def test_paged_out_rows_are_ordinary_rows_a_restart_finds(tmp_path: Path) -> None:
    """A queue pages non-persistent messages out as ordinary rows: after a restart they are there too."""
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    queue = MessageQueue(name="q", protocol=Protocol.MQTT, limits=QueueLimits(100, 10**6, DROP_OLDEST),
                         budget=MemoryBudget(0), metrics=Metrics(), store=store, key="q", window=2)
    for n in range(5):
        queue.put(m(f"qos0-{n}", qos=0), 0)  # 2 in memory only, 3 paged out
    assert queue.paged == 3
    await store.committed()
    assert [(seq, msg.payload) for seq, msg, _ in await read(store, "q")] == [
        (1, b"qos0-2"), (2, b"qos0-3"), (3, b"qos0-4")]
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    stored = snapshot.queues["q"]
    assert [(seq, msg.payload, meta) for seq, msg, meta in stored.head] == [
        (1, b"qos0-2", 0), (2, b"qos0-3", 0), (3, b"qos0-4", 0)]
    assert stored.count == 3 and stored.last_seq == 3
    await store.aclose()


async def test_retained_messages_round_trip(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_retained(Message("a/b", b"one", 1, True))
    store.put_retained(Message("c", b"two", 2, True))
    store.put_retained(Message("a/b", b"replaced", 0, True))
    store.put_retained(Message("d", b"gone", 0, True))
    store.delete_retained("d")
    store.delete_retained("never")
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    assert sorted(snapshot.retained, key=lambda msg: msg.topic) == [
        Message("a/b", b"replaced", 0, True), Message("c", b"two", 2, True)]
    await store.aclose()


async def test_amqp_messages_come_back_with_exchange_key_and_properties(tmp_path: Path) -> None:
    exchange_key = exchange_and_key("amq.topic", "a.b")
    properties = b"\x80\x00\x04text"
    queued = AMQPMessage("a/b", b"body", 1, exchange_key=exchange_key, properties=properties)
    retained = AMQPMessage("r", b"kept", 1, True, exchange_key=exchange_key, properties=PROPERTIES_PERSISTENT)
    assert encode_message(queued)[0] == 1  # registered as kind 1
    store, _ = await opened(tmp_path)
    store.put_queue("amqp091:q", {})
    store.add_message("amqp091:q", 1, queued, 0)
    store.add_message("amqp091:q", 2, m("plain"), 0)
    store.put_retained(retained)
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    (_, first, _), (_, second, _) = snapshot.queues["amqp091:q"].head
    assert type(first) is AMQPMessage and first == queued
    assert (first.exchange_key, first.properties) == (exchange_key, properties)
    assert type(second) is Message and second == m("plain")
    (back,) = snapshot.retained
    assert type(back) is AMQPMessage and (back.exchange_key, back.properties) == (exchange_key, PROPERTIES_PERSISTENT)
    assert back.retain
    await store.aclose()


def test_message_kinds_registry() -> None:
    class Other(Message):
        __slots__ = ()

    with pytest.raises(ValueError, match="already registered"):
        register_message_type(Other, 1, lambda message: b"", lambda *args: Message("t", b""))
    assert encode_message(Other("t", b"x")) == (0, b"")  # unregistered subclass: kept as a plain Message
    assert decode_message(99, "t", b"x", 1, False, b"extra") == Message("t", b"x", 1)  # unknown kind


# -- sequence numbers: renumbering, running out ---------------------------------------------------------


def test_the_sqlite_store_gives_a_queue_2_to_the_40_numbers() -> None:
    assert SQLiteStore.max_seq == MAX_SEQ == 2**40 - 1
    assert MemoryStore.max_seq == 2**62 - 1  # the base default


async def test_renumber_gives_fresh_rowids_so_a_pending_remove_cannot_touch_a_new_row(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    for key in ("a", "b", "c"):
        store.put_queue(key, {"key": key})
        store.add_message(key, 1, m(f"{key}-old"), 0)
    await store.committed()
    # In one batch: the old row's remove, the renumber, a new row with the same seq.
    store.remove_message("b", 1)
    store.renumber("b")
    store.add_message("b", 1, m("b-new"), 7)
    await store.committed()
    assert [(seq, msg.payload) for seq, msg, _ in await read(store, "b")] == [(1, b"b-new")]
    store.renumber("never")  # an unknown queue: nothing to do
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    assert [(seq, msg.payload, meta) for seq, msg, meta in snapshot.queues["b"].head] == [(1, b"b-new", 7)]
    assert snapshot.queues["b"].meta == {"key": "b"} and snapshot.queues["b"].last_seq == 1
    assert [msg.payload for _, msg, _ in snapshot.queues["a"].head] == [b"a-old"]
    assert [msg.payload for _, msg, _ in snapshot.queues["c"].head] == [b"c-old"]
    # The old queue number is free again: a new queue that takes it sees no row of "b".
    store.put_queue("d", {})
    store.add_message("d", 2, m("d"), 0)
    await store.committed()
    assert [msg.payload for _, msg, _ in await read(store, "d")] == [b"d"]
    assert [msg.payload for _, msg, _ in await read(store, "b")] == [b"b-new"]
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    await store.aclose()
    assert {key: [msg.payload for _, msg, _ in queue.head] for key, queue in snapshot.queues.items()} == {
        "a": [b"a-old"], "b": [b"b-new"], "c": [b"c-old"], "d": [b"d"]}
    assert rows_on_disk(tmp_path) == 4


def _queue_on(store: SQLiteStore, key: str, metrics: Metrics, window: int = WINDOW) -> MessageQueue:
    return MessageQueue(name=key, protocol=Protocol.AMQP091, limits=QueueLimits(10, 10**6, DROP_OLDEST),
                        budget=MemoryBudget(0), metrics=metrics, store=store, key=key, window=window)


async def test_a_queue_near_max_seq_renumbers_once_empty_and_refuses_while_it_is_not(tmp_path: Path) -> None:
    """Past MAX_SEQ a rowid would spill into the next queue's range: the queue renumbers or refuses instead."""
    store, _ = await opened(tmp_path)
    for key in ("a", "b", "c"):
        store.put_queue(key, {})
    store.add_message("b", MAX_SEQ - 1, m("b's old message"), 0)  # as after 2**40 messages through "b"
    store.add_message("c", MAX_SEQ - 1, m("c's old message"), 0)
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    metrics = Metrics()
    b, c = _queue_on(store, "b", metrics), _queue_on(store, "c", metrics)
    b.restore(snapshot.queues["b"])
    c.restore(snapshot.queues["c"])
    # "b" empties: its next message is numbered 1 again.
    b.settle(b.popleft()[2])
    assert b.put(m("b's message"), 0, persistent=True) == STORED and b.entries[0][2] == 1
    # "c" never empties: it takes MAX_SEQ, then refuses.
    assert c.put(m("c's last"), 0, persistent=True) == STORED and c.entries[-1][2] == MAX_SEQ
    assert c.put(m("c's refused"), 0, persistent=True) == 0  # NO_PUBLISHER: nobody to tell
    assert metrics.messages_dropped == {(Protocol.AMQP091, "queue_numbers_exhausted"): 1}
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    await store.aclose()
    assert [(seq, msg.payload) for seq, msg, _ in snapshot.queues["b"].head] == [(1, b"b's message")]
    assert [(seq, msg.payload) for seq, msg, _ in snapshot.queues["c"].head] == [
        (MAX_SEQ - 1, b"c's old message"), (MAX_SEQ, b"c's last")]
    assert snapshot.queues["a"].head == [] and rows_on_disk(tmp_path) == 3


async def test_a_purged_restored_queue_does_not_come_back_after_a_restart(tmp_path: Path) -> None:
    store, _ = await opened(tmp_path)
    store.put_queue("q", {})
    queue = _queue_on(store, "q", Metrics(), window=2)
    for n in range(1, 6):
        queue.put(m(str(n)), 0, persistent=True)
    delivered = []
    while queue:
        while queue.entries:
            delivered.append(queue.popleft())
        await store.committed()
        await asyncio.sleep(0)
    queue.settle(delivered[3][2])  # the fourth was acknowledged first; the gateway stops
    await store.aclose()
    store, snapshot = await opened(tmp_path, window=2)
    queue = _queue_on(store, "q", Metrics(), window=2)
    queue.restore(snapshot.queues["q"])
    assert len(queue) == 4
    assert queue.purge() == 4
    await store.aclose()
    store, snapshot = await opened(tmp_path)
    await store.aclose()
    assert snapshot.queues["q"].count == 0 and rows_on_disk(tmp_path) == 0


# -- property: whatever the interleaving, a reopened store holds the model's rows --------------------------

#: (operation, queue key, number): add, remove (number picks a row), renumber (when the queue has no row),
#: commit, yield.
Op = tuple[str, str, int]

_store_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(["q1", "q2"]), st.just(0)),
        st.tuples(st.just("renumber"), st.sampled_from(["q1", "q2"]), st.just(0)),
        st.tuples(st.just("remove"), st.sampled_from(["q1", "q2"]), st.integers(0, 30)),
        st.tuples(st.just("commit"), st.just(""), st.just(0)),
        st.tuples(st.just("yield"), st.just(""), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=25, deadline=None)
@given(ops=_store_ops)
def test_a_reopened_store_holds_exactly_the_models_rows(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_check_interleaving(directory, ops))


async def _check_interleaving(directory: str, ops: list[Op]) -> None:
    store, _ = await opened(directory)
    model: dict[str, dict[int, bytes]] = {"q1": {}, "q2": {}}
    next_seq = {"q1": 0, "q2": 0}
    store_adds: list[bytes] = []
    for key in model:
        store.put_queue(key, {"key": key})
    for kind, key, number in ops:
        if kind == "add":
            next_seq[key] += 1
            seq = next_seq[key]
            payload = f"{key}-{seq}-{len(store_adds)}".encode()  # unique, also across a renumber
            store_adds.append(payload)
            store.add_message(key, seq, Message("t", payload, 1), seq)
            model[key][seq] = payload
        elif kind == "remove":
            if model[key]:
                seqs = sorted(model[key])
                seq = seqs[number % len(seqs)]
                store.remove_message(key, seq)
                del model[key][seq]
        elif kind == "renumber":
            if not model[key]:  # what a queue does: only once it holds no row
                store.renumber(key)
                next_seq[key] = 0
        elif kind == "commit":
            await store.committed()
        else:
            await asyncio.sleep(0)  # the writer may take the batch here, or not
    # While running, reads see every row.
    for key, rows in model.items():
        assert [(seq, msg.payload) for seq, msg, _ in await read(store, key)] == [
            (seq, rows[seq]) for seq in sorted(rows)]
    await store.aclose()
    store, snapshot = await opened(directory, window=1000)
    await store.aclose()
    for key, rows in model.items():
        kept = sorted(rows)
        queue = snapshot.queues[key]
        assert queue.meta == {"key": key}
        assert [(seq, msg.payload, meta) for seq, msg, meta in queue.head] == [(seq, rows[seq], seq) for seq in kept]
        assert queue.count == len(kept) and queue.last_seq == (kept[-1] if kept else 0)
