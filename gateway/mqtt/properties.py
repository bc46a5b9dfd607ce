"""MQTT 5 properties (OASIS MQTT 5.0, section 2.2.2): one immutable value per packet, and their wire form.

`Properties` holds (id, value) pairs in wire order, so repeatable properties
(user properties, subscription identifiers in a PUBLISH) keep their order as
the spec requires. Every property id has one data type and a set of packets
it may appear in (`SPEC`); the constructor checks a value's type and range,
`encode_properties` checks that the packet may carry it, and
`decode_properties` refuses what the peer may not send with the reason code
a v5 peer is told: 0x81 for a wrong type or a property in the wrong packet,
0x82 for a property twice or a value the spec forbids.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from typing import Any, Union

from gateway.mqtt.errors import MQTTProtocolError
from gateway.mqtt.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    NAMES,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    WILL,
)
from gateway.mqtt.reasons import MALFORMED_PACKET, PROTOCOL_ERROR

#: Data types (spec 2.2.2.2).
BYTE = 0
TWO_BYTE_INT = 1
FOUR_BYTE_INT = 2
VARIABLE_BYTE_INT = 3
UTF8_STRING = 4
BINARY_DATA = 5
UTF8_STRING_PAIR = 6

TYPE_NAMES = ("byte", "two-byte integer", "four-byte integer", "variable byte integer", "UTF-8 string",
              "binary data", "UTF-8 string pair")

MAX_VARIABLE_BYTE_INT = 268_435_455


class PropertyId(enum.IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


P = PropertyId


def _mask(*kinds: int) -> int:
    out = 0
    for kind in kinds:
        out |= 1 << kind
    return out


_ACKS = (PUBACK, PUBREC, PUBREL, PUBCOMP)
_EVERY = (CONNECT, CONNACK, PUBLISH, WILL, *_ACKS, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, DISCONNECT, AUTH)

#: id -> (data type, packets that may carry it as a bit mask over packet kinds).
SPEC: dict[int, tuple[int, int]] = {
    P.PAYLOAD_FORMAT_INDICATOR: (BYTE, _mask(PUBLISH, WILL)),
    P.MESSAGE_EXPIRY_INTERVAL: (FOUR_BYTE_INT, _mask(PUBLISH, WILL)),
    P.CONTENT_TYPE: (UTF8_STRING, _mask(PUBLISH, WILL)),
    P.RESPONSE_TOPIC: (UTF8_STRING, _mask(PUBLISH, WILL)),
    P.CORRELATION_DATA: (BINARY_DATA, _mask(PUBLISH, WILL)),
    P.SUBSCRIPTION_IDENTIFIER: (VARIABLE_BYTE_INT, _mask(PUBLISH, SUBSCRIBE)),
    P.SESSION_EXPIRY_INTERVAL: (FOUR_BYTE_INT, _mask(CONNECT, CONNACK, DISCONNECT)),
    P.ASSIGNED_CLIENT_IDENTIFIER: (UTF8_STRING, _mask(CONNACK)),
    P.SERVER_KEEP_ALIVE: (TWO_BYTE_INT, _mask(CONNACK)),
    P.AUTHENTICATION_METHOD: (UTF8_STRING, _mask(CONNECT, CONNACK, AUTH)),
    P.AUTHENTICATION_DATA: (BINARY_DATA, _mask(CONNECT, CONNACK, AUTH)),
    P.REQUEST_PROBLEM_INFORMATION: (BYTE, _mask(CONNECT)),
    P.WILL_DELAY_INTERVAL: (FOUR_BYTE_INT, _mask(WILL)),
    P.REQUEST_RESPONSE_INFORMATION: (BYTE, _mask(CONNECT)),
    P.RESPONSE_INFORMATION: (UTF8_STRING, _mask(CONNACK)),
    P.SERVER_REFERENCE: (UTF8_STRING, _mask(CONNACK, DISCONNECT)),
    P.REASON_STRING: (UTF8_STRING, _mask(CONNACK, *_ACKS, SUBACK, UNSUBACK, DISCONNECT, AUTH)),
    P.RECEIVE_MAXIMUM: (TWO_BYTE_INT, _mask(CONNECT, CONNACK)),
    P.TOPIC_ALIAS_MAXIMUM: (TWO_BYTE_INT, _mask(CONNECT, CONNACK)),
    P.TOPIC_ALIAS: (TWO_BYTE_INT, _mask(PUBLISH)),
    P.MAXIMUM_QOS: (BYTE, _mask(CONNACK)),
    P.RETAIN_AVAILABLE: (BYTE, _mask(CONNACK)),
    P.USER_PROPERTY: (UTF8_STRING_PAIR, _mask(*_EVERY)),
    P.MAXIMUM_PACKET_SIZE: (FOUR_BYTE_INT, _mask(CONNECT, CONNACK)),
    P.WILDCARD_SUBSCRIPTION_AVAILABLE: (BYTE, _mask(CONNACK)),
    P.SUBSCRIPTION_IDENTIFIER_AVAILABLE: (BYTE, _mask(CONNACK)),
    P.SHARED_SUBSCRIPTION_AVAILABLE: (BYTE, _mask(CONNACK)),
}

#: Properties that may appear more than once, and in which packets (spec 2.2.2.2 and 3.3.2.3.8).
_REPEATABLE: dict[int, int] = {
    P.USER_PROPERTY: _mask(*_EVERY),
    P.SUBSCRIPTION_IDENTIFIER: _mask(PUBLISH),
}
#: Byte properties whose only values are 0 and 1.
_BOOLEAN = frozenset((
    P.PAYLOAD_FORMAT_INDICATOR, P.REQUEST_PROBLEM_INFORMATION, P.REQUEST_RESPONSE_INFORMATION, P.MAXIMUM_QOS,
    P.RETAIN_AVAILABLE, P.WILDCARD_SUBSCRIPTION_AVAILABLE, P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    P.SHARED_SUBSCRIPTION_AVAILABLE,
))
#: Integer properties for which 0 is a protocol error.
_NONZERO = frozenset((P.SUBSCRIPTION_IDENTIFIER, P.RECEIVE_MAXIMUM, P.TOPIC_ALIAS, P.MAXIMUM_PACKET_SIZE))

_INT_LIMITS = {BYTE: 0xFF, TWO_BYTE_INT: 0xFFFF, FOUR_BYTE_INT: 0xFFFF_FFFF, VARIABLE_BYTE_INT: MAX_VARIABLE_BYTE_INT}
_MAX_STRING = 65_535

PropertyValue = Union[int, str, bytes, tuple[str, str]]

#: Names for keyword construction: Properties(message_expiry_interval=60, user_property=[("k", "v")]).
_BY_NAME = {member.name.lower(): member for member in PropertyId}


def property_name(property_id: int) -> str:
    try:
        return PropertyId(property_id).name.lower()
    except ValueError:
        return f"property 0x{property_id:02x}"


def _check_value(property_id: int, value: object) -> PropertyValue:
    """`value` as stored for `property_id`; ValueError when its type or range is wrong."""
    spec = SPEC.get(property_id)
    if spec is None:
        raise ValueError(f"0x{property_id:02x} is not an MQTT 5 property id")
    kind = spec[0]
    name = property_name(property_id)
    if kind in _INT_LIMITS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} is a {TYPE_NAMES[kind]}, got {value!r}")
        if not 0 <= value <= _INT_LIMITS[kind]:
            raise ValueError(f"{name} must be 0..{_INT_LIMITS[kind]}, got {value!r}")
        if property_id in _BOOLEAN and value > 1:
            raise ValueError(f"{name} must be 0 or 1, got {value!r}")
        if property_id in _NONZERO and not value:
            raise ValueError(f"{name} must not be 0")
        return int(value)
    if kind == UTF8_STRING:
        if not isinstance(value, str):
            raise ValueError(f"{name} is a UTF-8 string, got {value!r}")
        _check_text(name, value)
        return value
    if kind == BINARY_DATA:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"{name} is binary data, got {type(value).__name__}")
        data = bytes(value)
        if len(data) > _MAX_STRING:
            raise ValueError(f"{name} holds at most {_MAX_STRING} bytes, got {len(data)}")
        return data
    if not (isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(part, str) for part in value)):
        raise ValueError(f"{name} is a pair of UTF-8 strings, got {value!r}")
    key, text = value
    _check_text(name, key)
    _check_text(name, text)
    return (key, text)


def _check_text(name: str, text: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not encodable as UTF-8 (a lone surrogate)") from None
    if size > _MAX_STRING:
        raise ValueError(f"{name} holds at most {_MAX_STRING} bytes of UTF-8, got {size}")
    if "\x00" in text:
        raise ValueError(f"{name} must not contain U+0000 (MQTT-1.5.4-2)")


class Properties:
    """The MQTT 5 properties of one packet: an immutable sequence of (id, value) in wire order.

    Read one with `props.get(PropertyId.X)` or the named accessor
    (`props.message_expiry_interval`), every value of a repeatable one with
    `get_all`. Build with pairs, names or both:
    `Properties([(PropertyId.CONTENT_TYPE, "text/plain")], user_property=[("k", "v")])`.
    """

    __slots__ = ("items",)

    items: tuple[tuple[int, PropertyValue], ...]

    def __init__(self, items: Iterable[tuple[int, Any]] = (), /, **named: Any) -> None:
        pairs: list[tuple[int, PropertyValue]] = []
        for property_id, value in items:
            pairs.append((int(property_id), _check_value(int(property_id), value)))
        for name, value in named.items():
            member = _BY_NAME.get(name)
            if member is None:
                raise TypeError(f"unknown MQTT 5 property {name!r}")
            if value is None:
                continue
            if member in _REPEATABLE and isinstance(value, list | tuple) and not (
                member == P.USER_PROPERTY and len(value) == 2 and all(isinstance(part, str) for part in value)
            ):
                pairs.extend((int(member), _check_value(member, one)) for one in value)
            else:
                pairs.append((int(member), _check_value(member, value)))
        seen: set[int] = set()
        for property_id, _value in pairs:
            if property_id in seen and property_id not in _REPEATABLE:
                raise ValueError(f"{property_name(property_id)} may appear only once")
            seen.add(property_id)
        object.__setattr__(self, "items", tuple(pairs))

    @classmethod
    def _trusted(cls, items: tuple[tuple[int, PropertyValue], ...]) -> Properties:
        """From pairs already checked (the decoder's, or a subset of another Properties)."""
        props = object.__new__(cls)
        object.__setattr__(props, "items", items)
        return props

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Properties are immutable; use replace() or without()")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Properties are immutable")

    # -- reading --------------------------------------------------------------------------------

    def get(self, property_id: int, default: Any = None) -> Any:
        """The first value of `property_id`, or `default`."""
        for key, value in self.items:
            if key == property_id:
                return value
        return default

    def get_all(self, property_id: int) -> tuple[Any, ...]:
        return tuple(value for key, value in self.items if key == property_id)

    def __contains__(self, property_id: object) -> bool:
        return any(key == property_id for key, _ in self.items)

    def __iter__(self) -> Iterator[tuple[int, PropertyValue]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Properties):
            return NotImplemented
        return self.items == other.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        if not self.items:
            return "Properties()"
        shown = ", ".join(f"{property_name(key)}={value!r}" for key, value in self.items)
        return f"Properties({shown})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Properties, (self.items,))

    # -- deriving -------------------------------------------------------------------------------

    def replace(self, items: Iterable[tuple[int, Any]] = (), /, **named: Any) -> Properties:
        """These properties with the given ones replacing every value of the same id (or added)."""
        update = Properties(items, **named)
        ids = {key for key, _ in update.items}
        kept = tuple(pair for pair in self.items if pair[0] not in ids)
        return Properties._trusted(kept + update.items)

    def without(self, *property_ids: int) -> Properties:
        if not any(key in property_ids for key, _ in self.items):
            return self
        return Properties._trusted(tuple(pair for pair in self.items if pair[0] not in property_ids))

    # -- named accessors (None when absent; repeatable ones as tuples) -----------------------------

    @property
    def payload_format_indicator(self) -> int | None:
        return self.get(P.PAYLOAD_FORMAT_INDICATOR)  # type: ignore[no-any-return]

    @property
    def message_expiry_interval(self) -> int | None:
        return self.get(P.MESSAGE_EXPIRY_INTERVAL)  # type: ignore[no-any-return]

    @property
    def content_type(self) -> str | None:
        return self.get(P.CONTENT_TYPE)  # type: ignore[no-any-return]

    @property
    def response_topic(self) -> str | None:
        return self.get(P.RESPONSE_TOPIC)  # type: ignore[no-any-return]

    @property
    def correlation_data(self) -> bytes | None:
        return self.get(P.CORRELATION_DATA)  # type: ignore[no-any-return]

    @property
    def subscription_identifiers(self) -> tuple[int, ...]:
        return self.get_all(P.SUBSCRIPTION_IDENTIFIER)

    @property
    def session_expiry_interval(self) -> int | None:
        return self.get(P.SESSION_EXPIRY_INTERVAL)  # type: ignore[no-any-return]

    @property
    def assigned_client_identifier(self) -> str | None:
        return self.get(P.ASSIGNED_CLIENT_IDENTIFIER)  # type: ignore[no-any-return]

    @property
    def server_keep_alive(self) -> int | None:
        return self.get(P.SERVER_KEEP_ALIVE)  # type: ignore[no-any-return]

    @property
    def authentication_method(self) -> str | None:
        return self.get(P.AUTHENTICATION_METHOD)  # type: ignore[no-any-return]

    @property
    def authentication_data(self) -> bytes | None:
        return self.get(P.AUTHENTICATION_DATA)  # type: ignore[no-any-return]

    @property
    def request_problem_information(self) -> int | None:
        return self.get(P.REQUEST_PROBLEM_INFORMATION)  # type: ignore[no-any-return]

    @property
    def will_delay_interval(self) -> int | None:
        return self.get(P.WILL_DELAY_INTERVAL)  # type: ignore[no-any-return]

    @property
    def request_response_information(self) -> int | None:
        return self.get(P.REQUEST_RESPONSE_INFORMATION)  # type: ignore[no-any-return]

    @property
    def response_information(self) -> str | None:
        return self.get(P.RESPONSE_INFORMATION)  # type: ignore[no-any-return]

    @property
    def server_reference(self) -> str | None:
        return self.get(P.SERVER_REFERENCE)  # type: ignore[no-any-return]

    @property
    def reason_string(self) -> str | None:
        return self.get(P.REASON_STRING)  # type: ignore[no-any-return]

    @property
    def receive_maximum(self) -> int | None:
        return self.get(P.RECEIVE_MAXIMUM)  # type: ignore[no-any-return]

    @property
    def topic_alias_maximum(self) -> int | None:
        return self.get(P.TOPIC_ALIAS_MAXIMUM)  # type: ignore[no-any-return]

    @property
    def topic_alias(self) -> int | None:
        return self.get(P.TOPIC_ALIAS)  # type: ignore[no-any-return]

    @property
    def maximum_qos(self) -> int | None:
        return self.get(P.MAXIMUM_QOS)  # type: ignore[no-any-return]

    @property
    def retain_available(self) -> int | None:
        return self.get(P.RETAIN_AVAILABLE)  # type: ignore[no-any-return]

    @property
    def user_properties(self) -> tuple[tuple[str, str], ...]:
        return self.get_all(P.USER_PROPERTY)

    @property
    def maximum_packet_size(self) -> int | None:
        return self.get(P.MAXIMUM_PACKET_SIZE)  # type: ignore[no-any-return]

    @property
    def wildcard_subscription_available(self) -> int | None:
        return self.get(P.WILDCARD_SUBSCRIPTION_AVAILABLE)  # type: ignore[no-any-return]

    @property
    def subscription_identifier_available(self) -> int | None:
        return self.get(P.SUBSCRIPTION_IDENTIFIER_AVAILABLE)  # type: ignore[no-any-return]

    @property
    def shared_subscription_available(self) -> int | None:
        return self.get(P.SHARED_SUBSCRIPTION_AVAILABLE)  # type: ignore[no-any-return]


#: No properties: what every packet of a 3.1.1 connection and most v5 packets carry.
EMPTY = Properties._trusted(())


# --------------------------------------------------------------------------- wire form

_pack_two = struct.Struct(">H").pack
_pack_four = struct.Struct(">I").pack


def encode_varint(value: int) -> bytes:
    """A variable byte integer (spec 1.5.5): 1 to 4 bytes, 7 bits each, low bits first."""
    if not 0 <= value <= MAX_VARIABLE_BYTE_INT:
        raise ValueError(f"a variable byte integer holds 0..{MAX_VARIABLE_BYTE_INT}, got {value!r}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_text(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _pack_two(len(raw)) + raw


def _encode_value(kind: int, value: PropertyValue) -> bytes:
    if kind == BYTE:
        return bytes((value,))  # type: ignore[arg-type]
    if kind == TWO_BYTE_INT:
        return _pack_two(value)
    if kind == FOUR_BYTE_INT:
        return _pack_four(value)
    if kind == VARIABLE_BYTE_INT:
        return encode_varint(value)  # type: ignore[arg-type]
    if kind == UTF8_STRING:
        return _encode_text(value)  # type: ignore[arg-type]
    if kind == BINARY_DATA:
        return _pack_two(len(value)) + value  # type: ignore[arg-type,operator]
    pair: tuple[str, str] = value  # type: ignore[assignment]
    return _encode_text(pair[0]) + _encode_text(pair[1])


def encode_properties(props: Properties, kind: int) -> bytes:
    """Property length (a variable byte integer) and the properties, for a packet of `kind`.

    ValueError when a property may not appear in that packet (or not twice):
    what this server sends is checked as strictly as what it receives.
    """
    if not props.items:
        return b"\x00"
    bit = 1 << kind
    seen = 0
    parts = []
    for property_id, value in props.items:
        data_type, allowed = SPEC[property_id]
        if not allowed & bit:
            raise ValueError(f"{property_name(property_id)} may not appear in {NAMES[kind]}")
        id_bit = 1 << property_id
        if seen & id_bit and not _REPEATABLE.get(property_id, 0) & bit:
            raise ValueError(f"{property_name(property_id)} may appear only once in {NAMES[kind]}")
        seen |= id_bit
        parts.append(bytes((property_id,)))
        parts.append(_encode_value(data_type, value))
    body = b"".join(parts)
    return encode_varint(len(body)) + body


def read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """A variable byte integer inside a packet: (value, offset after it)."""
    value = 0
    shift = 0
    for index in range(pos, min(pos + 4, end)):
        byte = buf[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    if end - pos >= 4:
        raise MQTTProtocolError(f"{what}: variable byte integer longer than 4 bytes (MQTT-1.5.5)")
    raise MQTTProtocolError(f"{what}: packet ends inside a variable byte integer")


def _read_text(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise MQTTProtocolError(f"{what}: packet ends inside its length prefix")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise MQTTProtocolError(f"{what}: string runs past the end of the properties")
    try:
        text = buf[pos + 2 : stop].decode("utf-8")
    except UnicodeDecodeError:
        raise MQTTProtocolError(f"{what} is not valid UTF-8 (MQTT-1.5.4-1)") from None
    if "\x00" in text:
        raise MQTTProtocolError(f"{what} contains U+0000 (MQTT-1.5.4-2)")
    return text, stop


def decode_properties(buf: bytes, pos: int, end: int, kind: int) -> tuple[Properties, int]:
    """The properties of a `kind` packet starting at `pos` (at its property length): (props, offset after)."""
    where = f"{NAMES[kind]} properties"
    length, pos = read_varint(buf, pos, end, where)
    if not length:
        return EMPTY, pos
    stop = pos + length
    if stop > end:
        raise MQTTProtocolError(f"{where}: property length {length} runs past the end of the packet")
    bit = 1 << kind
    seen = 0
    items: list[tuple[int, PropertyValue]] = []
    while pos < stop:
        property_id = buf[pos]
        spec = SPEC.get(property_id)
        if spec is None:
            raise MQTTProtocolError(f"{where}: 0x{property_id:02x} is not a property identifier (MQTT-2.2.2)")
        data_type, allowed = spec
        name = property_name(property_id)
        if not allowed & bit:
            raise MQTTProtocolError(f"{where}: {name} may not appear in {NAMES[kind]}")
        id_bit = 1 << property_id
        if seen & id_bit and not _REPEATABLE.get(property_id, 0) & bit:
            raise MQTTProtocolError(f"{where}: {name} appears more than once", reason_code=PROTOCOL_ERROR)
        seen |= id_bit
        pos += 1
        value: PropertyValue
        if data_type == BYTE:
            if pos >= stop:
                raise MQTTProtocolError(f"{where}: {name} is cut short")
            value = buf[pos]
            pos += 1
        elif data_type == TWO_BYTE_INT:
            if pos + 2 > stop:
                raise MQTTProtocolError(f"{where}: {name} is cut short")
            value = buf[pos] << 8 | buf[pos + 1]
            pos += 2
        elif data_type == FOUR_BYTE_INT:
            if pos + 4 > stop:
                raise MQTTProtocolError(f"{where}: {name} is cut short")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif data_type == VARIABLE_BYTE_INT:
            value, pos = read_varint(buf, pos, stop, f"{where}: {name}")
        elif data_type == UTF8_STRING:
            value, pos = _read_text(buf, pos, stop, f"{where}: {name}")
        elif data_type == BINARY_DATA:
            if pos + 2 > stop:
                raise MQTTProtocolError(f"{where}: {name} is cut short")
            data_end = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
            if data_end > stop:
                raise MQTTProtocolError(f"{where}: {name} runs past the end of the properties")
            value = buf[pos + 2 : data_end]
            pos = data_end
        else:
            key, pos = _read_text(buf, pos, stop, f"{where}: {name} key")
            text, pos = _read_text(buf, pos, stop, f"{where}: {name} value")
            value = (key, text)
        if property_id in _BOOLEAN and value not in (0, 1):  # type: ignore[comparison-overlap]
            raise MQTTProtocolError(f"{where}: {name} must be 0 or 1, got {value!r}", reason_code=PROTOCOL_ERROR)
        if property_id in _NONZERO and value == 0:  # type: ignore[comparison-overlap]
            raise MQTTProtocolError(f"{where}: {name} must not be 0", reason_code=PROTOCOL_ERROR)
        items.append((property_id, value))
    if pos != stop:  # pragma: no cover - every branch above stops at `stop` or raises
        raise MQTTProtocolError(f"{where}: the last property runs past the property length", reason_code=MALFORMED_PACKET)
    return Properties._trusted(tuple(items)), stop
