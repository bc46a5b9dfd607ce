"""The message every protocol hands to the router: a leaf module, so codecs import nothing above it.

A `Message` is topic, payload, QoS and retain. What else a publisher said
(MQTT 5 properties, AMQP properties and headers) stays in the frontend's own
subclass, in its own wire form, and costs nothing while the message stays in
that protocol. When it crosses to another one, the subscriber's frontend asks
`message.properties_for_others()` for the protocol-neutral `MessageProperties`
and writes them in its own words (README: "MQTT 5 metadata across protocols").
"""

from __future__ import annotations

import time
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

    def properties_for_others(self) -> MessageProperties:
        """What the publisher said beyond topic and payload, for a subscriber of another protocol.

        A subclass that keeps wire properties overrides this (and may cache the
        answer: it is asked once per delivery to another protocol).
        """
        return NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """A message's metadata in no protocol's words: what MQTT 5, AMQP 0.9.1 and AMQP 1.0 can all say."""

    content_type: str = ""
    #: None: not given (MQTT 5 tells an empty value from none).
    correlation_data: bytes | None = None
    response_topic: str = ""
    #: In order, repeats kept (MQTT 5 user properties; AMQP headers / application-properties).
    user_properties: tuple[tuple[str, str], ...] = ()
    #: The payload is UTF-8 text (MQTT 5 payload format indicator 1).
    payload_utf8: bool = False
    #: Wall-clock time (time.time()) after which the message is not delivered; 0.0: never.
    #: Wall clock, not monotonic, so that a stored message keeps its expiry across a restart.
    expires_at: float = 0.0

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at != 0.0 and (time.time() if now is None else now) >= self.expires_at

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before expiry (0 when expired), or None when the message never expires."""
        if self.expires_at == 0.0:
            return None
        return max(0.0, self.expires_at - (time.time() if now is None else now))


NO_PROPERTIES = MessageProperties()


_set_topic = Message.__dict__["topic"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_qos = Message.__dict__["qos"].__set__
_set_retain = Message.__dict__["retain"].__set__
