"""`storage.backend: memory`: nothing is kept across a restart, and nothing waits for a disk."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.message import Message
from gateway.store.base import Snapshot, Store, StoredEntry


class MemoryStore(Store):
    """Writes are no-ops: queues and sessions live in memory only, and acknowledgements never wait."""

    durable = False
    acks_wait = False

    async def open(self, *, window: int) -> Snapshot:
        return Snapshot()

    async def aclose(self, timeout: float | None = None) -> None:
        return None

    def put_queue(self, key: str, meta: Mapping[str, Any]) -> None:
        return None

    def delete_queue(self, key: str) -> None:
        return None

    def add_message(self, key: str, seq: int, message: Message, meta: int) -> None:
        return None

    def remove_messages_after(self, key: str, seq: int) -> None:
        return None

    def renumber(self, key: str) -> None:
        return None

    def remove_message(self, key: str, seq: int) -> None:
        return None

    def put_retained(self, message: Message) -> None:
        return None

    def delete_retained(self, topic: str) -> None:
        return None

    def read_messages(self, key: str, after_seq: int, limit: int, callback: Callable[[list[StoredEntry]], None]) -> None:
        # Nothing is ever paged out to this store.
        callback([])

    @property
    def token(self) -> int:
        return 0

    def when_committed(self, token: int, callback: Callable[[], None]) -> None:
        callback()
