"""A durable `Store` for unit tests: it records every call, keeps a model of its rows, and commits by hand."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.message import Message
from gateway.store.base import Snapshot, Store, StoredEntry


class RecordingStore(Store):
    """Durable (callers write to it), nothing on disk.

    - `calls`: every write as a tuple, in order (`("add", key, seq, payload, meta)`, `("renumber", key)`, ...).
    - `rows`: key -> {seq: (message, meta)}, what a real store would hold now (a restart finds all of them).
    - `max_seq`: the highest sequence number a queue may use before it must renumber (the base
      default unless given; a small one lets a test reach it).
    - `renumber(key)` is only legal for a queue with no rows (else AssertionError: the queue
      miscounted its rows); it records the call.
    - Commits happen only when the test calls `commit()`: `token` is the open batch,
      `when_committed` callbacks of committed tokens run then (at once if already committed).
    - Reads are answered at once from `rows` when `auto_read`, else kept in `reads` until
      `answer_reads()` (a real store answers later, on the loop). Either way the answer is what
      the rows were when the read was asked for: a real store runs the read in order with the
      writes, after every write made before it and before any made after.
    """

    durable = True

    def __init__(self, *, acks_wait: bool = True, auto_read: bool = True, max_seq: int | None = None,
                 first_token: int = 1) -> None:
        self.acks_wait = acks_wait
        if max_seq is not None:
            self.max_seq = max_seq
        self.auto_read = auto_read
        self.calls: list[tuple[Any, ...]] = []
        self.rows: dict[str, dict[int, tuple[Message, int]]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.retained: dict[str, Message] = {}
        self.reads: list[tuple[Callable[[list[StoredEntry]], None], list[StoredEntry]]] = []
        self._token = first_token
        self.committed_token = first_token - 1
        self._waiting: list[tuple[int, Callable[[], None]]] = []

    # -- the Store interface ------------------------------------------------------------------

    async def open(self, *, window: int) -> Snapshot:
        return Snapshot()

    async def aclose(self, timeout: float | None = None) -> None:
        return None

    def put_queue(self, key: str, meta: Mapping[str, Any]) -> None:
        self.calls.append(("put_queue", key, dict(meta)))
        self.queues[key] = dict(meta)

    def delete_queue(self, key: str) -> None:
        self.calls.append(("delete_queue", key))
        self.queues.pop(key, None)
        self.rows.pop(key, None)

    def add_message(self, key: str, seq: int, message: Message, meta: int) -> None:
        assert 1 <= seq <= self.max_seq, f"seq {seq} outside 1..max_seq"
        self.calls.append(("add", key, seq, message.payload, meta))
        self.rows.setdefault(key, {})[seq] = (message, meta)

    def renumber(self, key: str) -> None:
        assert not self.rows.get(key), f"renumber of {key!r}, which still holds rows {sorted(self.rows[key])}"
        self.calls.append(("renumber", key))

    def remove_messages_after(self, key: str, seq: int) -> None:
        self.calls.append(("remove_after", key, seq))
        rows = self.rows.get(key, {})
        for number in [n for n in rows if n > seq]:
            del rows[number]

    def remove_message(self, key: str, seq: int) -> None:
        self.calls.append(("remove", key, seq))
        self.rows.get(key, {}).pop(seq, None)

    def put_retained(self, message: Message) -> None:
        self.calls.append(("put_retained", message.topic, message.payload))
        self.retained[message.topic] = message

    def delete_retained(self, topic: str) -> None:
        self.calls.append(("delete_retained", topic))
        self.retained.pop(topic, None)

    def read_messages(self, key: str, after_seq: int, limit: int, callback: Callable[[list[StoredEntry]], None]) -> None:
        self.calls.append(("read", key, after_seq, limit))
        if self.auto_read:
            callback(self.select(key, after_seq, limit))
        else:
            self.reads.append((callback, self.select(key, after_seq, limit)))

    @property
    def token(self) -> int:
        return self._token

    def when_committed(self, token: int, callback: Callable[[], None]) -> None:
        if not self.acks_wait or token <= self.committed_token:
            callback()
        else:
            self._waiting.append((token, callback))

    # -- driving it from a test ---------------------------------------------------------------

    def select(self, key: str, after_seq: int, limit: int) -> list[StoredEntry]:
        rows = self.rows.get(key, {})
        return [(seq, rows[seq][0], rows[seq][1]) for seq in sorted(rows) if seq > after_seq][:limit]

    def answer_reads(self) -> int:
        """Answer the reads asked for so far (with the rows as they were then); how many."""
        reads, self.reads = self.reads, []
        for callback, entries in reads:
            callback(entries)
        return len(reads)

    def commit(self) -> None:
        """The open batch becomes durable: its callbacks run, a new batch opens."""
        self.committed_token = self._token
        self._token += 1
        ready = [cb for token, cb in self._waiting if token <= self.committed_token]
        self._waiting = [(token, cb) for token, cb in self._waiting if token > self.committed_token]
        for callback in ready:
            callback()

    def ops(self, *kinds: str) -> list[tuple[Any, ...]]:
        return [call for call in self.calls if call[0] in kinds]

    def payloads(self, key: str) -> list[bytes]:
        """Payloads of the rows a queue holds, in seq order."""
        rows = self.rows.get(key, {})
        return [rows[seq][0].payload for seq in sorted(rows)]
