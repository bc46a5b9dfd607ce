"""MQTT control packets (3.1.1 and 5) as small frozen values, plus the protocol's codes.

One class per packet type serves both versions: the MQTT 5 fields (reason
codes, `properties`, subscription options) default to what a 3.1.1 packet
means, so a 3.1.1 packet is the same value with those defaults. Constructors
check the invariants the encoder relies on, so a packet that exists can be
encoded (for its version: the encoder refuses a v5-only field on 3.1.1);
the decoder's `*_from_wire` constructors skip the checks it has made on the
wire. `Publish` and the acknowledgements are built on the hot path and take
positional arguments; the rest are keyword-only. A `Publish` is also the
router's `Message`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.message import Message
from gateway.mqtt import reasons
from gateway.mqtt.errors import MQTTProtocolError
from gateway.mqtt.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    PINGREQ,
    PINGRESP,
    PROTOCOL_NAME,
    PROTOCOL_NAME_31,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
)
from gateway.mqtt.properties import EMPTY, Properties

__all__ = [
    "AUTH", "CONNACK", "CONNECT", "DISCONNECT", "PINGREQ", "PINGRESP", "PUBACK", "PUBCOMP", "PUBLISH", "PUBREC",
    "PUBREL", "SUBACK", "SUBSCRIBE", "UNSUBACK", "UNSUBSCRIBE", "MQTTProtocolError", "PROTOCOL_NAME_31",
]

#: CONNACK return codes (MQTT 3.1.1 table 3.1).
CONNACK_ACCEPTED = reasons.V4_ACCEPTED
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = reasons.V4_UNACCEPTABLE_PROTOCOL_VERSION
CONNACK_IDENTIFIER_REJECTED = reasons.V4_IDENTIFIER_REJECTED
CONNACK_SERVER_UNAVAILABLE = reasons.V4_SERVER_UNAVAILABLE
CONNACK_BAD_USERNAME_OR_PASSWORD = reasons.V4_BAD_USERNAME_OR_PASSWORD
CONNACK_NOT_AUTHORIZED = reasons.V4_NOT_AUTHORIZED

#: SUBACK return code for a refused filter in 3.1.1; 0, 1 and 2 are the granted QoS.
SUBACK_FAILURE = 0x80

#: The largest value the 4-byte remaining-length varint can carry.
MAX_REMAINING_LENGTH = 268_435_455
MAX_PACKET_ID = 65_535
MAX_STRING_BYTES = 65_535

PROTOCOL_NAME_311 = PROTOCOL_NAME
PROTOCOL_LEVEL_311 = MQTT_311
PROTOCOL_LEVEL_31 = MQTT_31
PROTOCOL_LEVEL_5 = MQTT_5


def _check_packet_id(kind: str, packet_id: int) -> None:
    if not 0 < packet_id <= MAX_PACKET_ID:
        raise ValueError(f"{kind} packet id must be 1..65535, got {packet_id!r}")


def _check_qos(kind: str, qos: int) -> None:
    if qos not in (0, 1, 2):
        raise ValueError(f"{kind} QoS must be 0, 1 or 2, got {qos!r}")


def _check_reason(kind: str, code: int, allowed: frozenset[int]) -> None:
    if code not in allowed:
        raise ValueError(f"{kind} reason code 0x{code:02x} is not one MQTT 5 allows there")


def _check_properties(kind: str, properties: object) -> None:
    if not isinstance(properties, Properties):
        raise ValueError(f"{kind} properties must be a Properties, got {type(properties).__name__}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    #: MQTT 5 will properties (will delay, message expiry, content type, ...).
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_qos("will", self.qos)
        _check_properties("will", self.properties)


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect:
    protocol_name: str = PROTOCOL_NAME_311
    #: 3 (MQTT 3.1, "MQIsdp"), 4 (3.1.1) or 5.
    protocol_level: int = PROTOCOL_LEVEL_311
    #: 3.1.1's clean session; MQTT 5's clean start (whether the session outlives
    #: the connection is then the session expiry interval's business).
    clean_session: bool = True
    keepalive: int = 0
    client_id: str = ""
    will: Will | None = None
    username: str | None = None
    # Kept out of repr so a logged packet never shows the secret.
    password: bytes | None = field(default=None, repr=False)
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        if not 0 <= self.keepalive <= 0xFFFF:
            raise ValueError(f"keepalive must be 0..65535 seconds, got {self.keepalive!r}")
        if not 0 <= self.protocol_level <= 0xFF:
            raise ValueError(f"protocol level must fit one byte, got {self.protocol_level!r}")
        _check_properties("CONNECT", self.properties)

    @property
    def clean_start(self) -> bool:
        return self.clean_session


@dataclass(frozen=True, slots=True, kw_only=True)
class Connack:
    session_present: bool = False
    #: The 3.1.1 return code or the MQTT 5 reason code, as on the wire of the connection's version.
    reason_code: int = CONNACK_ACCEPTED
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        if not 0 <= self.reason_code <= 0xFF:
            raise ValueError(f"CONNACK reason code must fit one byte, got {self.reason_code!r}")
        if self.session_present and self.reason_code != CONNACK_ACCEPTED:
            raise ValueError("CONNACK session_present must be False when the connection is refused")
        _check_properties("CONNACK", self.properties)


@dataclass(frozen=True, slots=True, init=False)
class Publish(Message):
    """A PUBLISH: the routable message (topic, payload, qos, retain) plus its wire-only fields.

    Being a `Message`, an allowed PUBLISH goes to the router as it is: one
    object per message instead of a packet and then a copy of its fields.
    Subscribers read only the `Message` fields; `dup`, `packet_id` and (for
    now) `properties` belong to the publisher's connection.
    """

    dup: bool = False
    packet_id: int | None = None
    properties: Properties = EMPTY

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
        properties: Properties = EMPTY,
    ) -> None:
        if qos:
            if qos != 1 and qos != 2:
                raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
            if packet_id is None or not 0 < packet_id <= MAX_PACKET_ID:
                raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        elif packet_id is not None or dup:
            raise ValueError("a QoS 0 PUBLISH has no packet id and no DUP flag (MQTT-2.3.1-5, MQTT-3.3.1-2)")
        if properties.__class__ is not Properties:
            _check_properties("PUBLISH", properties)
        _set_topic(self, topic)
        _set_payload(self, payload)
        _set_qos(self, qos)
        _set_retain(self, retain)
        _set_dup(self, dup)
        _set_packet_id(self, packet_id)
        if properties is not EMPTY:
            _set_properties(self, properties)

    # A slot left unset reads as its default (see `_unset_default`): the hot
    # path does not pay for a field that a 3.1.1 message never has.
    def __getattr__(self, name: str) -> object:
        return _unset_default(self, name)


def _unset_default(packet: object, name: str) -> object:
    """The default of an MQTT 5 field whose slot was left unset (no reason code, no properties).

    Python calls `__getattr__` only when the normal lookup failed, i.e. for an
    unset slot; filling two more slots per packet would cost the decoder
    about a tenth of a PUBLISH's and a third of a PUBACK's decoding time.
    """
    if name == "properties":
        return EMPTY
    if name == "reason_code":
        return 0
    raise AttributeError(f"{type(packet).__name__!r} object has no attribute {name!r}")


# Slot descriptors, to fill the frozen fields; the inherited ones live on Message.
_set_topic = Message.__dict__["topic"].__set__
_set_payload = Message.__dict__["payload"].__set__
_set_qos = Message.__dict__["qos"].__set__
_set_retain = Message.__dict__["retain"].__set__
_set_dup = Publish.__dict__["dup"].__set__
_set_packet_id = Publish.__dict__["packet_id"].__set__
_set_properties = Publish.__dict__["properties"].__set__


@dataclass(frozen=True, slots=True, init=False)
class _Ack:
    """Base of PUBACK, PUBREC, PUBREL and PUBCOMP: a packet id, and in MQTT 5 a reason code and properties."""

    packet_id: int
    reason_code: int = 0
    properties: Properties = EMPTY

    #: The reason codes MQTT 5 allows in this packet.
    _codes = reasons.PUBACK_CODES

    # Written by hand for the same reason as Publish.__init__: one per message.
    def __init__(self, packet_id: int, reason_code: int = 0, properties: Properties = EMPTY) -> None:
        if not 0 < packet_id <= MAX_PACKET_ID:
            raise ValueError(f"{type(self).__name__} packet id must be 1..65535, got {packet_id!r}")
        if reason_code:
            _check_reason(type(self).__name__.upper(), reason_code, self._codes)
        if properties.__class__ is not Properties:
            _check_properties(type(self).__name__.upper(), properties)
        _set_ack_packet_id(self, packet_id)
        if reason_code:
            _set_ack_reason(self, reason_code)
        if properties is not EMPTY:
            _set_ack_properties(self, properties)

    def __getattr__(self, name: str) -> object:
        return _unset_default(self, name)


_set_ack_packet_id = _Ack.__dict__["packet_id"].__set__
_set_ack_reason = _Ack.__dict__["reason_code"].__set__
_set_ack_properties = _Ack.__dict__["properties"].__set__


@dataclass(frozen=True, slots=True, init=False)
class Puback(_Ack):
    """QoS 1 acknowledgement."""


@dataclass(frozen=True, slots=True, init=False)
class Pubrec(_Ack):
    """QoS 2, step 1: publish received."""

    _codes = reasons.PUBREC_CODES


@dataclass(frozen=True, slots=True, init=False)
class Pubrel(_Ack):
    """QoS 2, step 2: publish release."""

    _codes = reasons.PUBREL_CODES


@dataclass(frozen=True, slots=True, init=False)
class Pubcomp(_Ack):
    """QoS 2, step 3: publish complete."""

    _codes = reasons.PUBCOMP_CODES


_new = object.__new__


# The decoder's constructors. It has already checked every field on the wire
# (QoS, DUP only with QoS > 0, packet id 1..65535), so they skip `__init__`
# and its checks: going through `type.__call__` into a Python `__init__` costs
# about as much as the decoding of the fields itself, twice per message.
def publish_from_wire(
    topic: str,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    properties: Properties = EMPTY,
) -> Publish:
    packet = _new(Publish)
    _set_topic(packet, topic)
    _set_payload(packet, payload)
    _set_qos(packet, qos)
    _set_retain(packet, retain)
    _set_dup(packet, dup)
    _set_packet_id(packet, packet_id)
    if properties is not EMPTY:
        _set_properties(packet, properties)
    return packet


def ack_from_wire(kind: type[_Ack], packet_id: int, reason_code: int = 0, properties: Properties = EMPTY) -> _Ack:
    packet = _new(kind)
    _set_ack_packet_id(packet, packet_id)
    if reason_code:
        _set_ack_reason(packet, reason_code)
    if properties is not EMPTY:
        _set_ack_properties(packet, properties)
    return packet


def puback_from_wire(packet_id: int) -> Puback:
    packet = _new(Puback)
    _set_ack_packet_id(packet, packet_id)
    return packet


#: Retain handling (MQTT 5 subscription option): when retained messages are sent at SUBSCRIBE.
RETAIN_SEND = 0  # at every subscribe
RETAIN_SEND_IF_NEW = 1  # only when the subscription did not exist
RETAIN_DO_NOT_SEND = 2


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """One topic filter's subscription options byte (3.1.1: the requested QoS alone)."""

    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = RETAIN_SEND

    def __post_init__(self) -> None:
        _check_qos("SUBSCRIBE requested", self.qos)
        if self.retain_handling not in (0, 1, 2):
            raise ValueError(f"retain handling must be 0, 1 or 2, got {self.retain_handling!r}")

    def to_byte(self) -> int:
        return (
            self.qos
            | (0x04 if self.no_local else 0)
            | (0x08 if self.retain_as_published else 0)
            | self.retain_handling << 4
        )

    @property
    def v4_only(self) -> bool:
        """Nothing but the QoS is set: what a 3.1.1 SUBSCRIBE can carry."""
        return not (self.no_local or self.retain_as_published or self.retain_handling)


#: The options of a 3.1.1 subscription at each QoS.
QOS_OPTIONS = (SubscriptionOptions(0), SubscriptionOptions(1), SubscriptionOptions(2))


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, SubscriptionOptions], ...]
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_packet_id("SUBSCRIBE", self.packet_id)
        if not self.topics:
            raise ValueError("SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3)")
        for _topic_filter, options in self.topics:
            if not isinstance(options, SubscriptionOptions):
                raise ValueError(f"SUBSCRIBE options must be SubscriptionOptions, got {options!r}")
        _check_properties("SUBSCRIBE", self.properties)


@dataclass(frozen=True, slots=True, kw_only=True)
class Suback:
    packet_id: int
    #: One per requested filter: the granted QoS, or 0x80 (3.1.1) / an MQTT 5 error reason code.
    reason_codes: tuple[int, ...]
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_packet_id("SUBACK", self.packet_id)
        if not self.reason_codes:
            raise ValueError("SUBACK needs one reason code per requested filter")
        for code in self.reason_codes:
            _check_reason("SUBACK", code, reasons.SUBACK_CODES)
        _check_properties("SUBACK", self.properties)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_packet_id("UNSUBSCRIBE", self.packet_id)
        if not self.topics:
            raise ValueError("UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2)")
        _check_properties("UNSUBSCRIBE", self.properties)


@dataclass(frozen=True, slots=True)
class Unsuback:
    packet_id: int
    #: MQTT 5: one per filter of the UNSUBSCRIBE; 3.1.1 has none.
    reason_codes: tuple[int, ...] = ()
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_packet_id("UNSUBACK", self.packet_id)
        for code in self.reason_codes:
            _check_reason("UNSUBACK", code, reasons.UNSUBACK_CODES)
        _check_properties("UNSUBACK", self.properties)


@dataclass(frozen=True, slots=True)
class Pingreq:
    pass


@dataclass(frozen=True, slots=True)
class Pingresp:
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect:
    #: MQTT 5 only (3.1.1's DISCONNECT is empty and only a client sends it).
    reason_code: int = reasons.NORMAL_DISCONNECTION
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_reason("DISCONNECT", self.reason_code, reasons.DISCONNECT_CODES)
        _check_properties("DISCONNECT", self.properties)


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """MQTT 5 enhanced authentication step (method and data in the properties)."""

    reason_code: int = reasons.SUCCESS
    properties: Properties = EMPTY

    def __post_init__(self) -> None:
        _check_reason("AUTH", self.reason_code, reasons.AUTH_CODES)
        _check_properties("AUTH", self.properties)


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
    | Auth
)

#: The packet type number of each packet class.
KIND_OF: dict[type, int] = {
    Connect: CONNECT,
    Connack: CONNACK,
    Publish: PUBLISH,
    Puback: PUBACK,
    Pubrec: PUBREC,
    Pubrel: PUBREL,
    Pubcomp: PUBCOMP,
    Subscribe: SUBSCRIBE,
    Suback: SUBACK,
    Unsubscribe: UNSUBSCRIBE,
    Unsuback: UNSUBACK,
    Pingreq: PINGREQ,
    Pingresp: PINGRESP,
    Disconnect: DISCONNECT,
    Auth: AUTH,
}
