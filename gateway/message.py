"""The message every protocol hands to the router: a leaf module, so codecs import nothing above it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Message:
    # Not kw_only: frontends build one per PUBLISH and positional is cheaper.
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False

    # One is built per message on every protocol. The generated frozen __init__
    # goes through object.__setattr__ per field (~0.7 us); writing the slots
    # through their descriptors keeps the same signature at ~0.4 us.
    def __init__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        _set_topic(self, topic)
        _set_payload(self, payload)
        _set_qos(self, qos)
        _set_retain(self, retain)


_set_topic = Message.__dict__["topic"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_qos = Message.__dict__["qos"].__set__
_set_retain = Message.__dict__["retain"].__set__
