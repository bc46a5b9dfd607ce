"""Durable state: retained messages, persistent sessions and durable queues (`storage.*`)."""

from __future__ import annotations

from gateway.config_types import StorageConfig
from gateway.store.base import Snapshot, Store, StoredEntry, StoredQueue, register_message_type
from gateway.store.memory import MemoryStore

__all__ = ["Snapshot", "Store", "StoredEntry", "StoredQueue", "open_store", "register_message_type"]


def open_store(config: StorageConfig) -> Store:
    """The backend `storage.backend` names (not yet opened: call `open`)."""
    if config.backend == "memory":
        return MemoryStore()
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(config.path, fsync=config.fsync)
