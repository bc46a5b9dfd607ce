"""The embedded store: SQLite in WAL mode, one writer thread, group commit.

The event loop never touches the database. Writes go into the open batch (a
list of operations, one append each); at most one batch is being committed
at a time, and the next one gathers meanwhile, so under load every commit
carries many writes. A message added and removed before its batch was handed
over (delivered and acknowledged in the meantime) is never written at all.
While consumers acknowledge that fast (RabbitMQ's message store works the
same way), a batch is held up to GATHER for their acknowledgements, and
handed over at once when none of its writes is left; when they do not, a
batch is handed over at once and a lone publisher waits for nothing more than
its commit.

Durability, by `storage.fsync`:
- `always`: each commit is fsynced (`synchronous=FULL`) before the batch's
  acknowledgements go out: nothing acknowledged is lost, even at a power loss.
- `batch` (default): each commit is written to the WAL before the
  acknowledgements go out, so a killed gateway (kill -9) loses nothing; the
  WAL is fsynced at least every FSYNC_INTERVAL seconds, which bounds what an
  operating-system crash or power loss can take.
- `never`: acknowledgements do not wait for the store at all; a killed
  gateway loses what was not yet committed (at most about one batch).

Rows of one queue share a rowid range (queue number << SEQ_BITS | seq), so a
message is one row of one B-tree, found, paged and deleted by range.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.errors import StorageError
from gateway.message import Message
from gateway.store.base import Snapshot, Store, StoredEntry, StoredQueue, decode_message, encode_message

log = logging.getLogger("polygate.store")

DB_NAME = "polygate.db"
LOCK_NAME = "polygate.lock"
#: Bits of a rowid that hold the message's sequence number within its queue. A
#: queue renumbers from 1 when it is empty (gateway.queues); one that never empties
#: for 2**40 messages (four months at 100,000 a second) refuses more until it does.
SEQ_BITS = 40
MAX_SEQ = (1 << SEQ_BITS) - 1
#: fsync: batch: the WAL is fsynced at least this often while there are writes.
FSYNC_INTERVAL = 1.0
#: fsync: batch: a batch of at most this many operations is committed on the event loop
#: itself (a WAL append, tens of microseconds) instead of crossing to the writer thread and
#: back, which costs more than the commit; larger batches and every fsync go to the thread.
INLINE_OPS = 16
#: While consumers acknowledge messages within about a commit of their write, a batch waits at most this
#: long after its first write for their acknowledgements (each cancels a write).
GATHER = 0.002
#: A failed commit is tried again after this long (doubling up to the cap).
RETRY_FIRST, RETRY_CAP = 0.5, 5.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS queues (key TEXT PRIMARY KEY, qid INTEGER NOT NULL UNIQUE, meta TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, topic TEXT NOT NULL,"
    " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, meta INTEGER NOT NULL,"
    " extra BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, kind INTEGER NOT NULL, payload BLOB NOT NULL,"
    " qos INTEGER NOT NULL, extra BLOB NOT NULL)",
)
_INSERT = "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_DELETE = "DELETE FROM messages WHERE id = ?"
_DELETE_RANGE = "DELETE FROM messages WHERE id >= ? AND id <= ?"

# Operations of a batch: tuples whose first item says which.
_ADD, _REMOVE, _PUT_QUEUE, _DELETE_QUEUE, _PUT_RETAINED, _DELETE_RETAINED, _READ, _RENUMBER, _REMOVE_AFTER = range(9)

_SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}


class _Batch:
    """Writes gathered on the loop until the writer thread takes them."""

    __slots__ = ("token", "started", "live", "ops", "adds", "callbacks")

    def __init__(self, token: int) -> None:
        self.token = token
        #: loop.time() of the first write or wait; 0.0 while the batch is empty.
        self.started = 0.0
        #: Operations still to write (`ops` less the cancelled ones).
        self.live = 0
        #: In order; a cancelled add becomes None.
        self.ops: list[tuple[Any, ...] | None] = []
        #: rowid -> index in `ops` of an add not yet handed over (for cancelling it).
        self.adds: dict[int, int] = {}
        #: Run on the loop once this batch is committed.
        self.callbacks: list[Callable[[], None]] = []


class SQLiteStore(Store):
    durable = True
    max_seq = MAX_SEQ

    def __init__(self, directory: str, *, fsync: str = "batch") -> None:
        if fsync not in _SYNCHRONOUS:
            raise ValueError(f"fsync must be one of {', '.join(_SYNCHRONOUS)}, not {fsync!r}")
        self.directory = directory
        self.fsync = fsync
        self.acks_wait = fsync != "never"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._jobs: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._batch = _Batch(1)
        #: The batch the writer thread holds, if any.
        self._busy: _Batch | None = None
        #: The last committed batch: a remove of one of its rows is a quick acknowledgement too.
        self._last: _Batch = _Batch(0)
        self._handoff_handle: asyncio.Handle | None = None
        #: Writes cancelled or removed within about a commit since the last handoff, and whether
        #: the open batch waits (GATHER) for more of them.
        self._quick_acks = 0
        self._gathering = False
        self._committed = 0
        self._qids: dict[str, int] = {}
        self._free_qids: list[int] = []
        self._next_qid = 1
        self._closed = False
        #: Commits not yet fsynced (fsync: batch): the writer thread fsyncs the WAL within FSYNC_INTERVAL.
        self._dirty = False
        #: Set while commits fail; /ready reports it.
        self.failing = False
        self._failures = 0
        #: Counters for /metrics.
        self.commits = 0
        self.rows_written = 0
        self.writes_cancelled = 0

    # -- opening and closing -------------------------------------------------------------------

    async def open(self, *, window: int) -> Snapshot:
        self._loop = asyncio.get_running_loop()
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage.path {self.directory!r}: cannot create the directory: {exc.strerror or exc}") from None
        self._lock()
        opened: asyncio.Future[Snapshot] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(window, opened), name="polygate-store", daemon=True)
        self._thread.start()
        try:
            return await opened
        except BaseException:
            self._release_lock()
            raise

    def _lock(self) -> None:
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"storage.path {self.directory!r}: cannot open {LOCK_NAME}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageError(
                f"storage.path {self.directory!r} is in use by another Polygate process: give each gateway its own directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    async def aclose(self, timeout: float | None = None) -> None:
        """Commit what is pending (waiting at most `timeout`), then close the database."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        waiter: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        self._on_commit(self._batch.token, lambda: _resolve(waiter, None))
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            log.error("the store could not commit its last writes within %gs; they are lost", timeout,
                      extra={"event": "store_close_timeout"})
        self._jobs.put(None)
        thread = self._thread
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 5.0)
        self._release_lock()

    # -- writes (on the loop) ------------------------------------------------------------------

    def _qid(self, key: str) -> int:
        qid = self._qids.get(key)
        if qid is None:
            if self._free_qids:
                qid = self._free_qids.pop()
            else:
                qid = self._next_qid
                self._next_qid += 1
            self._qids[key] = qid
        return qid

    def _add_op(self, op: tuple[Any, ...]) -> None:
        batch = self._batch
        batch.ops.append(op)
        batch.live += 1
        if not batch.started:
            batch.started = self._loop.time()  # type: ignore[union-attr]
            if self._busy is None:
                self._schedule_handoff(GATHER if self._gathering else 0.0)

    def _cancel(self, batch: _Batch, rowid: int) -> None:
        """Drop the add of `rowid` from the open batch: it will never be written."""
        batch.ops[batch.adds.pop(rowid)] = None
        batch.live -= 1

    def _schedule_handoff(self, delay: float) -> None:
        if self._handoff_handle is None:
            loop = self._loop
            assert loop is not None
            self._handoff_handle = loop.call_later(delay, self._handoff) if delay > 0 else loop.call_soon(self._handoff)

    def put_queue(self, key: str, meta: Mapping[str, Any]) -> None:
        self._add_op((_PUT_QUEUE, key, self._qid(key), json.dumps(meta, separators=(",", ":"))))

    def delete_queue(self, key: str) -> None:
        qid = self._qids.pop(key, None)
        if qid is None:
            return
        batch = self._batch
        low, high = qid << SEQ_BITS, (qid + 1) << SEQ_BITS
        # Adds of this queue still in the open batch are simply not written.
        for rowid in [r for r in batch.adds if low <= r < high]:
            self._cancel(batch, rowid)
        self._add_op((_DELETE_QUEUE, key, qid))
        # The number is free again once the rows are gone (after this batch).
        batch.callbacks.append(lambda: self._free_qids.append(qid))

    def add_message(self, key: str, seq: int, message: Message, meta: int) -> None:
        rowid = self._qid(key) << SEQ_BITS | seq
        batch = self._batch
        batch.adds[rowid] = len(batch.ops)
        self._add_op((_ADD, rowid, message, meta))

    def remove_messages_after(self, key: str, seq: int) -> None:
        qid = self._qids.get(key)
        if qid is None:
            return
        batch = self._batch
        low, high = qid << SEQ_BITS | seq, (qid + 1) << SEQ_BITS
        for rowid in [r for r in batch.adds if low < r < high]:
            self._cancel(batch, rowid)
        self._add_op((_REMOVE_AFTER, low, high))

    def renumber(self, key: str) -> None:
        # A fresh queue number: removes still pending for the old numbers cannot touch new rows.
        old = self._qids.pop(key, None)
        if old is None:
            return
        qid = self._qid(key)
        self._add_op((_RENUMBER, key, qid))
        self._batch.callbacks.append(lambda: self._free_qids.append(old))

    def remove_message(self, key: str, seq: int) -> None:
        qid = self._qids.get(key)
        if qid is None:
            return
        rowid = qid << SEQ_BITS | seq
        batch = self._batch
        if rowid in batch.adds:
            # Delivered and acknowledged before it was ever written: write nothing.
            self._cancel(batch, rowid)
            self.writes_cancelled += 1
            self._quick_acks += 1
            if not batch.live and self._busy is None and self._handoff_handle is not None:
                # Nothing left to wait for: what waits on this batch need not wait longer.
                self._handoff_handle.cancel()
                self._handoff_handle = None
                self._schedule_handoff(0.0)
            return
        busy = self._busy
        if rowid in self._last.adds or (busy is not None and rowid in busy.adds):
            # Written a moment ago: had the batch waited a little, this write would not have been needed.
            self._quick_acks += 1
        self._add_op((_REMOVE, rowid))

    def put_retained(self, message: Message) -> None:
        self._add_op((_PUT_RETAINED, message))

    def delete_retained(self, topic: str) -> None:
        self._add_op((_DELETE_RETAINED, topic))

    def read_messages(self, key: str, after_seq: int, limit: int, callback: Callable[[list[StoredEntry]], None]) -> None:
        qid = self._qids.get(key)
        if qid is None:
            self._loop.call_soon(callback, [])  # type: ignore[union-attr]
            return
        self._add_op((_READ, qid, after_seq, limit, callback))

    # -- durability ----------------------------------------------------------------------------

    @property
    def token(self) -> int:
        return self._batch.token

    def when_committed(self, token: int, callback: Callable[[], None]) -> None:
        if not self.acks_wait:
            callback()
            return
        self._on_commit(token, callback)

    def _on_commit(self, token: int, callback: Callable[[], None]) -> None:
        if token <= self._committed:
            callback()
            return
        busy = self._busy
        if busy is not None and busy.token == token:
            busy.callbacks.append(callback)
            return
        batch = self._batch
        batch.callbacks.append(callback)
        if not batch.started:
            # A wait with no write in the batch: nothing to gather for.
            batch.started = self._loop.time()  # type: ignore[union-attr]
            if self._busy is None:
                self._schedule_handoff(0.0)

    def _handoff(self) -> None:
        """Give the open batch to the writer thread (or commit a small one here) and open the next one."""
        self._handoff_handle = None
        batch = self._batch
        if self._busy is not None or not batch.started:
            return
        self._busy = batch
        self._batch = _Batch(batch.token + 1)
        if batch.ops:
            # A batch of waits only says nothing about how fast consumers acknowledge.
            self._gathering = self._quick_acks > 0
            self._quick_acks = 0
        if not batch.live:
            # Nothing to write (every add was cancelled, or only waits): committed as it stands.
            self._done(batch, [], None)
            return
        conn = self._conn
        if conn is not None and len(batch.ops) <= INLINE_OPS:
            try:
                reads = self._apply(conn, batch)
                conn.commit()
            except sqlite3.Error as exc:
                _rollback(conn)
                self._done(batch, [], str(exc))
                return
            self._dirty = True
            self._done(batch, reads, None)
            return
        self._jobs.put(batch)

    def _done(self, batch: _Batch, reads: list[tuple[Callable[[list[StoredEntry]], None], list[StoredEntry]]],
              error: str | None) -> None:
        """On the loop: a batch was committed (or failed and will be tried again)."""
        if error is not None:
            self._failures += 1
            if not self.failing:
                log.error("the store cannot commit (%s): acknowledgements wait until it can; retrying", error,
                          extra={"event": "store_failing"})
            self.failing = True
            delay = min(RETRY_CAP, RETRY_FIRST * 2 ** min(self._failures - 1, 8))
            self._loop.call_later(delay, self._jobs.put, batch)  # type: ignore[union-attr]
            return
        if self.failing:
            log.warning("the store commits again after %d failed attempt(s)", self._failures,
                        extra={"event": "store_recovered"})
        self.failing = False
        self._failures = 0
        self._busy = None
        if batch.live:
            self._last = batch
        self._committed = batch.token
        self.commits += 1
        for reader, entries in reads:
            reader(entries)
        for callback in batch.callbacks:
            try:
                callback()
            except Exception:
                log.exception("a store commit callback failed")
        following = self._batch
        if following.started:
            delay = following.started + GATHER - self._loop.time() if following.live and self._gathering else 0.0  # type: ignore[union-attr]
            self._schedule_handoff(delay)

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self, window: int, opened: asyncio.Future[Snapshot]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            snapshot = self._load(conn, window)
        except BaseException as exc:
            error = exc if isinstance(exc, StorageError) else StorageError(
                f"storage.path {self.directory!r}: cannot open the database: {exc}")
            loop.call_soon_threadsafe(_fail, opened, error)
            return
        if self.fsync == "batch":
            # Small batches are committed on the loop (INLINE_OPS); `_busy` keeps the
            # two threads from ever using the connection at once.
            self._conn = conn
        loop.call_soon_threadsafe(_resolve, opened, snapshot)
        wal = os.path.join(self.directory, DB_NAME + "-wal")
        last_sync = time.monotonic()
        try:
            while True:
                try:
                    batch = self._jobs.get(timeout=FSYNC_INTERVAL if self._dirty else None)
                except queue.Empty:
                    batch = _IDLE
                if batch is _IDLE or (self._dirty and time.monotonic() - last_sync >= FSYNC_INTERVAL):
                    self._dirty = False
                    last_sync = _fsync(wal)
                if batch is _IDLE:
                    continue
                if batch is None:
                    break
                try:
                    reads = self._apply(conn, batch)
                    conn.commit()
                except sqlite3.Error as exc:
                    _rollback(conn)
                    loop.call_soon_threadsafe(self._done, batch, [], str(exc))
                    continue
                if self.fsync == "batch":
                    self._dirty = True
                loop.call_soon_threadsafe(self._done, batch, reads, None)
        finally:
            self._conn = None
            if self._dirty:
                _fsync(wal)
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        path = os.path.join(self.directory, DB_NAME)
        conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self.fsync]}")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.commit()
        return conn

    def _load(self, conn: sqlite3.Connection, window: int) -> Snapshot:
        snapshot = Snapshot()
        used: set[int] = set()
        for key, qid, meta in conn.execute("SELECT key, qid, meta FROM queues"):
            self._qids[key] = qid
            used.add(qid)
            try:
                parsed = json.loads(meta)
            except ValueError:
                log.error("durable queue %r has unreadable metadata; it is dropped", key)
                continue
            low, high = qid << SEQ_BITS, (qid + 1) << SEQ_BITS
            count, last = conn.execute(
                "SELECT count(*), max(id) FROM messages WHERE id >= ? AND id < ?", (low, high)).fetchone()
            head = _entries(conn.execute(
                "SELECT id, kind, topic, payload, qos, retain, meta, extra FROM messages"
                " WHERE id >= ? AND id < ? ORDER BY id LIMIT ?", (low, high, window)))
            snapshot.queues[key] = StoredQueue(key=key, meta=parsed, head=head, count=count,
                                               last_seq=(last & MAX_SEQ) if last is not None else 0)
        # Rows of queues that are gone (a crash between the two deletes cannot happen in
        # one transaction, but an older version or a hand edit might leave some).
        valid = sorted(used)
        orphans = conn.execute("SELECT count(*) FROM messages").fetchone()[0] - sum(q.count for q in snapshot.queues.values())
        if orphans:
            conn.execute("CREATE TEMP TABLE live (qid INTEGER PRIMARY KEY)")
            conn.executemany("INSERT INTO live VALUES (?)", [(q,) for q in valid])
            conn.execute(f"DELETE FROM messages WHERE (id >> {SEQ_BITS}) NOT IN (SELECT qid FROM live)")
            conn.execute("DROP TABLE live")
            log.warning("dropped %d stored message(s) that belonged to no queue", orphans)
        self._next_qid = (valid[-1] + 1) if valid else 1
        self._free_qids = sorted(set(range(1, self._next_qid)) - used, reverse=True)
        for kind, topic, payload, qos, extra in conn.execute("SELECT kind, topic, payload, qos, extra FROM retained"):
            snapshot.retained.append(decode_message(kind, topic, bytes(payload), qos, True, bytes(extra)))
        conn.commit()
        return snapshot

    def _apply(self, conn: sqlite3.Connection, batch: _Batch) -> list[tuple[Callable[[list[StoredEntry]], None], list[StoredEntry]]]:
        """Write one batch in one transaction, keeping the order of everything but single-row writes."""
        adds: list[tuple[Any, ...]] = []
        removes: list[int] = []
        reads: list[tuple[Callable[[list[StoredEntry]], None], list[StoredEntry]]] = []

        def segment() -> None:
            # Adds and removes of one segment never touch the same row: a remove of
            # an add of the same batch cancelled the add instead.
            if adds:
                conn.executemany(_INSERT, adds)
                self.rows_written += len(adds)
                adds.clear()
            if removes:
                # Consumers acknowledge mostly in order: one statement per run of consecutive rows.
                singles, runs = _runs(removes)
                if singles:
                    conn.executemany(_DELETE, singles)
                if runs:
                    conn.executemany(_DELETE_RANGE, runs)
                removes.clear()

        for op in batch.ops:
            if op is None:
                continue
            kind = op[0]
            if kind == _ADD:
                _, rowid, message, meta = op
                message_kind, extra = encode_message(message)
                adds.append((rowid, message_kind, message.topic, message.payload, message.qos, message.retain,
                             meta, extra))
            elif kind == _REMOVE:
                removes.append(op[1])
            else:
                segment()
                if kind == _PUT_QUEUE:
                    conn.execute("INSERT OR REPLACE INTO queues VALUES (?, ?, ?)", (op[1], op[2], op[3]))
                elif kind == _DELETE_QUEUE:
                    qid = op[2]
                    conn.execute("DELETE FROM messages WHERE id >= ? AND id < ?", (qid << SEQ_BITS, (qid + 1) << SEQ_BITS))
                    conn.execute("DELETE FROM queues WHERE key = ? AND qid = ?", (op[1], qid))
                elif kind == _REMOVE_AFTER:
                    conn.execute("DELETE FROM messages WHERE id > ? AND id < ?", (op[1], op[2]))
                elif kind == _RENUMBER:
                    conn.execute("UPDATE queues SET qid = ? WHERE key = ?", (op[2], op[1]))
                elif kind == _PUT_RETAINED:
                    message = op[1]
                    message_kind, extra = encode_message(message)
                    conn.execute("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?)",
                                 (message.topic, message_kind, message.payload, message.qos, extra))
                elif kind == _DELETE_RETAINED:
                    conn.execute("DELETE FROM retained WHERE topic = ?", (op[1],))
                elif kind == _READ:
                    _, qid, after_seq, limit, callback = op
                    low = qid << SEQ_BITS
                    reads.append((callback, _entries(conn.execute(
                        "SELECT id, kind, topic, payload, qos, retain, meta, extra FROM messages"
                        " WHERE id > ? AND id < ? ORDER BY id LIMIT ?",
                        (low | after_seq, (qid + 1) << SEQ_BITS, limit)))))
        segment()
        return reads


_IDLE: Any = object()


def _runs(rowids: list[int]) -> tuple[list[tuple[int]], list[tuple[int, int]]]:
    """Distinct rowids as (single rows, (first, last) of each run of two or more consecutive ones)."""
    singles: list[tuple[int]] = []
    runs: list[tuple[int, int]] = []
    ordered = sorted(rowids)
    first = last = ordered[0]
    for rowid in ordered[1:]:
        if rowid == last + 1:
            last = rowid
            continue
        if rowid == last:
            continue
        if first == last:
            singles.append((first,))
        else:
            runs.append((first, last))
        first = last = rowid
    if first == last:
        singles.append((first,))
    else:
        runs.append((first, last))
    return singles, runs


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        conn.rollback()
    except sqlite3.Error:
        pass


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _entries(rows: Any) -> list[StoredEntry]:
    return [
        (rowid & MAX_SEQ, decode_message(kind, topic, bytes(payload), qos, bool(retain), bytes(extra)), meta)
        for rowid, kind, topic, payload, qos, retain, meta, extra in rows
    ]


def _fsync(path: str) -> float:
    """fsync the WAL (what `synchronous=NORMAL` leaves to checkpoints); returns when it ran."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return time.monotonic()
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("fsync of %s failed: %s", path, exc)
    finally:
        os.close(fd)
    return time.monotonic()
