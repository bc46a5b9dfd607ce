"""The store interface: what must survive a restart, kept behind one narrow API.

Frontends and queues call it from the event loop and never wait on it: every
write is a cheap append to the open *batch*, and a batch is committed as a
whole (group commit). A write is durable once the batch it went into is
committed; `token` names the open batch and `when_committed(token, callback)`
runs the callback on the loop after that. An acknowledgement that promises
durability (PUBACK, confirm, 2xx...) is sent from such a callback.

What is kept:
- retained messages, by topic;
- durable queues (a persistent MQTT session, a durable AMQP 0.9.1 queue), by a
  key such as "mqtt:<client id>": a JSON-able `meta` mapping the owner writes
  and reads back (subscriptions, bindings, expiry...), and their messages,
  ordered by a sequence number the queue assigns.

A backend decides how (`gateway.store.sqlite` on disk, `gateway.store.memory`
for `storage.backend: memory`, a clustered one later); nothing above this
module knows which one runs.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.message import Message

#: A stored message as the store hands it back: (sequence number, message, the owner's meta int).
StoredEntry = tuple[int, Message, int]

#: Encode/decode of one Message subclass: kind number, to extra bytes, from (topic, payload, qos, retain, extra).
MessageEncoder = Callable[[Message], bytes]
MessageDecoder = Callable[[str, bytes, int, bool, bytes], Message]

_ENCODERS: dict[type, tuple[int, MessageEncoder]] = {Message: (0, lambda message: b"")}
_DECODERS: dict[int, MessageDecoder] = {0: lambda topic, payload, qos, retain, extra: Message(topic, payload, qos, retain)}


def register_message_type(cls: type, kind: int, encode: MessageEncoder, decode: MessageDecoder) -> None:
    """Let the store keep a Message subclass (e.g. an AMQP message with its properties) as itself."""
    known = _DECODERS.get(kind)
    if known is not None and _ENCODERS.get(cls, (None,))[0] != kind:
        raise ValueError(f"message kind {kind} is already registered")
    _ENCODERS[cls] = (kind, encode)
    _DECODERS[kind] = decode


def encode_message(message: Message) -> tuple[int, bytes]:
    """(kind, extra bytes) of a message; an unregistered subclass is kept as a plain Message."""
    entry = _ENCODERS.get(type(message))
    if entry is None:
        return 0, b""
    kind, encode = entry
    return kind, encode(message)


def decode_message(kind: int, topic: str, payload: bytes, qos: int, retain: bool, extra: bytes) -> Message:
    decode = _DECODERS.get(kind)
    if decode is None:
        # A kind whose frontend is not loaded: its routing fields still make a message.
        return Message(topic, payload, qos, retain)
    return decode(topic, payload, qos, retain, extra)


@dataclass(slots=True, kw_only=True)
class StoredQueue:
    """One durable queue as found at start: its meta and the head of its messages."""

    key: str
    meta: dict[str, Any]
    #: The first messages in order (at most the window asked for); the rest stay in the store.
    head: list[StoredEntry] = field(default_factory=list)
    #: Messages the store holds for it, `head` included.
    count: int = 0
    #: The highest sequence number used so far (0 when none).
    last_seq: int = 0


@dataclass(slots=True, kw_only=True)
class Snapshot:
    """Everything the store held when it opened."""

    retained: list[Message] = field(default_factory=list)
    queues: dict[str, StoredQueue] = field(default_factory=dict)

    def queues_of(self, prefix: str) -> list[StoredQueue]:
        """The queues whose key starts with `prefix` ("mqtt:", "amqp091:")."""
        return [queue for key, queue in self.queues.items() if key.startswith(prefix)]


class Store(abc.ABC):
    """Durable state behind the queues and the router. Every method runs on the event loop."""

    #: False when nothing is kept across a restart (the memory backend): callers
    #: then skip their writes and acknowledge at once.
    durable: bool = False
    #: True when an acknowledgement must wait for `when_committed` (fsync always/batch).
    acks_wait: bool = False
    #: The highest sequence number a queue may give a message before it must `renumber`.
    max_seq: int = (1 << 62) - 1

    @abc.abstractmethod
    async def open(self, *, window: int) -> Snapshot:
        """Open (creating when missing) and return what is kept, each queue's first `window` messages."""

    @abc.abstractmethod
    async def aclose(self, timeout: float | None = None) -> None:
        """Commit what is pending and release the storage."""

    # -- writes: appended to the open batch, committed together ----------------------------

    @abc.abstractmethod
    def put_queue(self, key: str, meta: Mapping[str, Any]) -> None:
        """Create or replace a durable queue's meta."""

    @abc.abstractmethod
    def delete_queue(self, key: str) -> None:
        """Remove a durable queue and every message it holds."""

    @abc.abstractmethod
    def add_message(self, key: str, seq: int, message: Message, meta: int) -> None:
        """Keep a message of a queue (also one kept only to page it out of memory: a restart finds it too)."""

    @abc.abstractmethod
    def remove_message(self, key: str, seq: int) -> None:
        """The message was delivered and acknowledged (or dropped): forget it."""

    @abc.abstractmethod
    def remove_messages_after(self, key: str, seq: int) -> None:
        """Forget every message of a queue numbered after `seq` (a purge of what is paged out)."""

    @abc.abstractmethod
    def renumber(self, key: str) -> None:
        """The queue holds no message any more and starts its sequence numbers again at 1."""

    @abc.abstractmethod
    def put_retained(self, message: Message) -> None: ...

    @abc.abstractmethod
    def delete_retained(self, topic: str) -> None: ...

    @abc.abstractmethod
    def read_messages(self, key: str, after_seq: int, limit: int, callback: Callable[[list[StoredEntry]], None]) -> None:
        """Read up to `limit` messages of a queue with seq > after_seq, after every write made so far;
        `callback` gets them on the loop."""

    # -- durability ------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def token(self) -> int:
        """The open batch: what is written now is durable once this token is committed."""

    @abc.abstractmethod
    def when_committed(self, token: int, callback: Callable[[], None]) -> None:
        """Run `callback` on the loop once the batch `token` is durable (at once when it is)."""

    async def committed(self, token: int | None = None) -> None:
        """Wait until what was written so far (or the batch `token`) is durable."""
        waiter = asyncio.get_running_loop().create_future()

        def done() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.when_committed(self.token if token is None else token, done)
        await waiter
