"""MQTT 3.1.1 control packets as small frozen values, plus the protocol's codes.

Constructors check the invariants the encoder relies on, so a packet that
exists can always be encoded (the decoder's `publish_from_wire` and
`puback_from_wire` skip the checks it has already made on the wire).
`Publish` and the four acknowledgements are built on the hot path and take
positional arguments; the rest are keyword-only. A `Publish` is also the
router's `Message`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ProtocolError
from gateway.message import Message

#: Fixed-header packet types (the high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

#: CONNACK return codes (MQTT 3.1.1 table 3.1).
CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_USERNAME_OR_PASSWORD = 4
CONNACK_NOT_AUTHORIZED = 5

#: SUBACK return code for a refused filter; 0, 1 and 2 are the granted QoS.
SUBACK_FAILURE = 0x80

#: The largest value the 4-byte remaining-length varint can carry.
MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_ID = 65_535
MAX_STRING_BYTES = 65_535

PROTOCOL_NAME_311 = "MQTT"
PROTOCOL_LEVEL_311 = 4
PROTOCOL_NAME_31 = "MQIsdp"
PROTOCOL_LEVEL_31 = 3


class MQTTProtocolError(ProtocolError):
    """The peer broke MQTT 3.1.1; the connection must be closed.

    `connack_code` is set when the specification wants a CONNACK with that code
    sent before closing (e.g. 1 for an unsupported protocol level). `decoded`
    holds the packets that arrived intact before the error in the same call of
    `MQTTDecoder.packets`, so a session may still act on them.
    """

    def __init__(self, message: str, *, connack_code: int | None = None) -> None:
        super().__init__(message)
        self.connack_code: int | None = connack_code
        self.decoded: tuple[Packet, ...] = ()


def _check_packet_id(kind: str, packet_id: int) -> None:
    if not 0 < packet_id <= MAX_PACKET_ID:
        raise ValueError(f"{kind} packet id must be 1..65535, got {packet_id!r}")


def _check_qos(kind: str, qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"{kind} QoS must be 0, 1 or 2, got {qos!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False

    def __post_init__(self) -> None:
        _check_qos("will", self.qos)


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    protocol_name: str = PROTOCOL_NAME_311
    protocol_level: int = PROTOCOL_LEVEL_311
    clean_session: bool = True
    keepalive: int = 0
    client_id: str = ""
    will: Will | None = None
    username: str | None = None
    # Kept out of repr so a logged packet never shows the secret.
    password: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive must be 0..65535 seconds, got {self.keepalive!r}")
        if not 0 <= self.protocol_level <= 0xFF:
            raise ValueError(f"protocol level must fit one byte, got {self.protocol_level!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Connack:
    session_present: bool = False
    return_code: int = CONNACK_ACCEPTED

    def __post_init__(self) -> None:
        if not 0 <= self.return_code <= 0xFF:
            raise ValueError(f"CONNACK return code must fit one byte, got {self.return_code!r}")
        if self.session_present and self.return_code != CONNACK_ACCEPTED:
            raise ValueError("CONNACK session_present must be False when the connection is refused")


@dataclass(frozen=True, slots=True, init=False)
class Publish(Message):
    """A PUBLISH: the routable message (topic, payload, qos, retain) plus its wire-only fields.

    Being a `Message`, an allowed PUBLISH goes to the router as it is: one
    object per message instead of a packet and then a copy of its fields.
    Subscribers read only the `Message` fields; `dup` and `packet_id` belong
    to the publisher's connection.
    """

    dup: bool = False
    packet_id: int | None = None

    # Written by hand: the generated frozen __init__ costs twice as much, and
    # one Publish is built per message on the hot path.
    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        dup: bool = False,
        packet_id: int | None = None,
    ) -> None:
        if qos:
            if qos != 1 and qos != 2:
                raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
            if packet_id is None or not 0 < packet_id <= MAX_PACKET_ID:
                raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        elif packet_id is not None or dup:
            raise ValueError("a QoS 0 PUBLISH has no packet id and no DUP flag (MQTT-2.3.1-5, MQTT-3.3.1-2)")
        _set_topic(self, topic)
        _set_payload(self, payload)
        _set_qos(self, qos)
        _set_retain(self, retain)
        _set_dup(self, dup)
        _set_packet_id(self, packet_id)


# Slot descriptors, to fill the frozen fields; the inherited ones live on Message.
_set_topic = Message.__dict__["topic"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_qos = Message.__dict__["qos"].__set__
_set_retain = Message.__dict__["retain"].__set__
_set_dup = Publish.__dict__["dup"].__set__
_set_packet_id = Publish.__dict__["packet_id"].__set__


@dataclass(frozen=True, slots=True, init=False)
class _PacketIdOnly:
    """Base of the packets that carry nothing but a packet id."""

    packet_id: int

    # Written by hand for the same reason as Publish.__init__: one per message.
    def __init__(self, packet_id: int) -> None:
        if not 0 < packet_id <= MAX_PACKET_ID:
            raise ValueError(f"{type(self).__name__} packet id must be 1..65535, got {packet_id!r}")
        _set_only_packet_id(self, packet_id)


_set_only_packet_id = _PacketIdOnly.packet_id.__set__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True, init=False)
class Puback(_PacketIdOnly):
    """QoS 1 acknowledgement."""


_new = object.__new__


# The decoder's constructors. It has already checked every field on the wire
# (QoS, DUP only with QoS > 0, packet id 1..65535), so they skip `__init__`
# and its checks: going through `type.__call__` into a Python `__init__` costs
# about as much as the decoding of the fields itself, twice per message.
def publish_from_wire(
    topic: str, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int | None
) -> Publish:
    packet = _new(Publish)
    _set_topic(packet, topic)
    _set_payload(packet, payload)
    _set_qos(packet, qos)
    _set_retain(packet, retain)
    _set_dup(packet, dup)
    _set_packet_id(packet, packet_id)
    return packet


def puback_from_wire(packet_id: int) -> Puback:
    packet = _new(Puback)
    _set_only_packet_id(packet, packet_id)
    return packet


@dataclass(frozen=True, slots=True, init=False)
class Pubrec(_PacketIdOnly):
    """QoS 2, step 1: publish received."""


@dataclass(frozen=True, slots=True, init=False)
class Pubrel(_PacketIdOnly):
    """QoS 2, step 2: publish release."""


@dataclass(frozen=True, slots=True, init=False)
class Pubcomp(_PacketIdOnly):
    """QoS 2, step 3: publish complete."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        _check_packet_id("SUBSCRIBE", self.packet_id)
        if not self.topics:
            raise ValueError("SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3)")
        for _topic_filter, qos in self.topics:
            _check_qos("SUBSCRIBE requested", qos)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suback:
    packet_id: int
    return_codes: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_packet_id("SUBACK", self.packet_id)
        if not self.return_codes:
            raise ValueError("SUBACK needs one return code per requested filter")
        for code in self.return_codes:
            if code not in (0, 1, 2, SUBACK_FAILURE):
                raise ValueError(f"SUBACK return code must be 0, 1, 2 or 0x80, got {code!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_packet_id("UNSUBSCRIBE", self.packet_id)
        if not self.topics:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")


@dataclass(frozen=True, slots=True, init=False)
class Unsuback(_PacketIdOnly):
    """UNSUBSCRIBE acknowledgement."""


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
)
