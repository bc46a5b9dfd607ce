"""Sans-IO MQTT codec, 3.1.1 and 5: bytes in, packets out; packets in, bytes out.

One decoder serves both versions: it starts in the version it is given
(3.1.1 by default) and a CONNECT switches it to the CONNECT's, so a server
learns the version from the first packet. The decoder checks every rule of
the specification a receiver must enforce on the wire (reserved flags,
string encoding, packet ids, lengths, property types, reason codes) and
leaves policy (topic filter syntax, limits, authorization) to the broker and
the connection state machine (`gateway.mqtt.connection`), which narrows
what the decoder accepts through its first-byte table. PUBLISH and PUBACK,
the packets of the hot path, are decoded inline in the parse loops;
everything else goes through a per-type, per-version function.

Buffering: the decoder keeps the unconsumed tail of the last chunk as an
immutable `bytes` plus an offset, so a read that holds whole packets (the
usual case) is parsed in place and a PUBLISH costs one copy, its payload
slice. Reads that cannot complete the pending packet (its size is known from
the fixed header) are only appended to a bytearray, so a large packet arriving
in many reads is joined once instead of once per read.

Encoding: `encode(packet, version)` for any packet; the hot path has its own
functions (`encode_publish_head` + `encode_packet_id`/`encode_packet_id5` +
payload, `PublishTemplate`, `encode_puback`). An MQTT 5 acknowledgement with
reason 0 and no properties has the same 4 bytes as a 3.1.1 one.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable

from gateway.mqtt import reasons
from gateway.mqtt.kinds import NAMES, WILL
from gateway.mqtt.packets import (
    AUTH,
    CONNACK,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    CONNECT,
    DISCONNECT,
    MAX_REMAINING_LENGTH,
    MAX_STRING_BYTES,
    PINGREQ,
    PINGRESP,
    PROTOCOL_LEVEL_5,
    PROTOCOL_LEVEL_31,
    PROTOCOL_LEVEL_311,
    PROTOCOL_NAME_31,
    PROTOCOL_NAME_311,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    QOS_OPTIONS,
    SUBACK,
    SUBACK_FAILURE,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
    _Ack,
    ack_from_wire,
    puback_from_wire,
    publish_from_wire,
)
from gateway.mqtt.properties import EMPTY, Properties, decode_properties, encode_properties, encode_varint

_PACKET_ID = struct.Struct(">H")
_PACKET_ID5 = struct.Struct(">HB")
_ACK = struct.Struct(">BBH")
_pack_packet_id = _PACKET_ID.pack
_pack_packet_id5 = _PACKET_ID5.pack
_pack_ack = _ACK.pack

#: Packet types whose fixed-header flags are fixed at 0b0010 (MQTT-3.6.1-1, 3.8.1-1, 3.10.1-1).
_FLAGS_0010 = frozenset((PUBREL, SUBSCRIBE, UNSUBSCRIBE))
#: Packets the decoder shows its owner before handing them out: they change a connection's
#: state (CONNECT, DISCONNECT, AUTH) or obey what the server announced (SUBSCRIBE).
_CONTROL = frozenset((CONNECT, DISCONNECT, AUTH, SUBSCRIBE))

# Topic names are cached by their wire bytes: a publisher repeats a few topics,
# and the cached str keeps its hash, which the router's dict lookups reuse.
# Bounded in entry count and entry size so hostile topics cannot grow it.
_TOPIC_CACHE_ENTRIES = 4096
_TOPIC_CACHE_MAX_BYTES = 256
_topic_names: dict[bytes, str] = {}
_topic_wire: dict[str, bytes] = {}


# --------------------------------------------------------------------------- decoding


def _first_byte_ok(first: int, version: int) -> bool:
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        return qos != 3 and not (qos == 0 and flags & 0x08)
    if kind in _FLAGS_0010:
        return flags == 0b0010
    if kind == AUTH:
        return version == PROTOCOL_LEVEL_5 and flags == 0
    return 0 < kind < AUTH and flags == 0


#: Every first byte a well-formed packet of each version may start with.
VALID_FIRST_BYTES = {
    PROTOCOL_LEVEL_311: bytes(_first_byte_ok(byte, PROTOCOL_LEVEL_311) for byte in range(256)),
    PROTOCOL_LEVEL_5: bytes(_first_byte_ok(byte, PROTOCOL_LEVEL_5) for byte in range(256)),
}


def _first_byte_error(first: int, version: int) -> MQTTProtocolError:
    kind, flags = first >> 4, first & 0x0F
    if kind == 0 or (kind == AUTH and version != PROTOCOL_LEVEL_5):
        return MQTTProtocolError(f"packet type {kind} is reserved (first byte 0x{first:02x})")
    if kind == PUBLISH:
        if (flags >> 1) & 3 == 3:
            return MQTTProtocolError("PUBLISH with QoS 3 is not allowed (MQTT-3.3.1-4)")
        return MQTTProtocolError("PUBLISH with QoS 0 must not set the DUP flag (MQTT-3.3.1-2)")
    expected = 0b0010 if kind in _FLAGS_0010 else 0
    return MQTTProtocolError(
        f"{NAMES[kind]} fixed-header flags must be 0b{expected:04b}, got 0b{flags:04b} (MQTT-2.2.2-2)"
    )


def _read_remaining_length(buf: bytes, pos: int, end: int, max_size: int) -> tuple[int, int]:
    """Decode the varint at `pos`: (length, offset after it), or (-1, 0) when incomplete."""
    value = 0
    shift = 0
    for index in range(pos, pos + 4):
        if index >= end:
            # Continuation bytes only add, so a prefix already over the cap is final.
            if value > max_size:
                raise _oversize(value, max_size)
            return -1, 0
        byte = buf[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise MQTTProtocolError("remaining length is longer than 4 bytes (MQTT-2.2.3)")


def _oversize(length: int, max_size: int) -> MQTTProtocolError:
    return MQTTProtocolError(
        f"packet of {length} bytes exceeds the maximum packet size of {max_size} bytes",
        reason_code=reasons.PACKET_TOO_LARGE,
    )


def _decode_topic_name(raw: bytes) -> str:
    """A PUBLISH or will topic: strict UTF-8, no NUL, no wildcards; cached when short."""
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MQTTProtocolError("topic name is not valid UTF-8 (MQTT-1.5.3-1)") from None
    if "\x00" in topic:
        raise MQTTProtocolError("topic name contains U+0000 (MQTT-1.5.3-2)")
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(
            f"topic name {topic!r} must not contain wildcards '+' or '#' (MQTT-3.3.2-2)",
            reason_code=reasons.TOPIC_NAME_INVALID,
        )
    if len(raw) <= _TOPIC_CACHE_MAX_BYTES:
        if len(_topic_names) >= _TOPIC_CACHE_ENTRIES:
            _topic_names.clear()
        _topic_names[raw] = topic
    return topic


def _read_string(buf: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    if pos + 2 > end:
        raise MQTTProtocolError(f"{what}: packet ends inside its length prefix")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise MQTTProtocolError(f"{what}: string runs past the end of the packet")
    try:
        text = buf[pos + 2 : stop].decode("utf-8")
    except UnicodeDecodeError:
        raise MQTTProtocolError(f"{what} is not valid UTF-8 (MQTT-1.5.3-1)") from None
    if "\x00" in text:
        raise MQTTProtocolError(f"{what} contains U+0000 (MQTT-1.5.3-2)")
    return text, stop


def _read_binary(buf: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise MQTTProtocolError(f"{what}: packet ends inside its length prefix")
    stop = pos + 2 + (buf[pos] << 8 | buf[pos + 1])
    if stop > end:
        raise MQTTProtocolError(f"{what}: data runs past the end of the packet")
    return buf[pos + 2 : stop], stop


def _read_packet_id(buf: bytes, pos: int, end: int, what: str) -> int:
    if pos + 2 > end:
        raise MQTTProtocolError(f"{what}: packet ends inside the packet id")
    packet_id = buf[pos] << 8 | buf[pos + 1]
    if not packet_id:
        raise MQTTProtocolError(f"{what} has packet id 0; it must be 1..65535 (MQTT-2.3.1-1)")
    return packet_id


def connect_level(buf: bytes, start: int, end: int) -> int | None:
    """The protocol level of the CONNECT body at `start`, when it says MQTT 5 ("MQTT", 5); else None.

    Read before the rest of the CONNECT, so an error in a v5 CONNECT is answered in v5's form.
    """
    if end - start >= 7 and buf[start : start + 6] == b"\x00\x04MQTT" and buf[start + 6] == PROTOCOL_LEVEL_5:
        return PROTOCOL_LEVEL_5
    return None


def _decode_connect(first: int, buf: bytes, start: int, end: int) -> Connect:
    name, pos = _read_string(buf, start, end, "CONNECT protocol name")
    if pos + 4 > end:
        raise MQTTProtocolError("CONNECT variable header is truncated")
    level = buf[pos]
    flags = buf[pos + 1]
    keepalive = buf[pos + 2] << 8 | buf[pos + 3]
    pos += 4
    # The level is checked before anything else: a version this server does not
    # speak cannot be parsed further, yet deserves CONNACK 1 (3.1.1's form).
    if name == PROTOCOL_NAME_311:
        if level != PROTOCOL_LEVEL_311 and level != PROTOCOL_LEVEL_5:
            raise MQTTProtocolError(
                f"unsupported MQTT protocol level {level}: this server speaks 3.1.1 (level 4), 5 and 3.1 "
                "(MQIsdp, level 3) (MQTT-3.1.2-2)",
                reason_code=reasons.UNSUPPORTED_PROTOCOL_VERSION,
                connack_code=CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            )
    elif name == PROTOCOL_NAME_31:
        if level != PROTOCOL_LEVEL_31:
            raise MQTTProtocolError(
                f"unsupported MQIsdp protocol level {level}: MQTT 3.1 is level 3",
                reason_code=reasons.UNSUPPORTED_PROTOCOL_VERSION,
                connack_code=CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            )
    else:
        raise MQTTProtocolError(f"unknown protocol name {name!r}: expected 'MQTT' (MQTT-3.1.2-1)")
    v5 = level == PROTOCOL_LEVEL_5
    if flags & 0x01:
        raise MQTTProtocolError("CONNECT reserved flag (bit 0) must be 0 (MQTT-3.1.2-3)")
    will_flag = flags & 0x04
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    password_flag = flags & 0x40
    username_flag = flags & 0x80
    if will_flag:
        if will_qos == 3:
            raise MQTTProtocolError("CONNECT will QoS 3 is not allowed (MQTT-3.1.2-14)")
    elif will_qos or will_retain:
        raise MQTTProtocolError("CONNECT will QoS and will retain must be 0 without the will flag (MQTT-3.1.2-13/15)")
    if password_flag and not username_flag and level == PROTOCOL_LEVEL_311:
        raise MQTTProtocolError("CONNECT password flag set without the username flag (MQTT-3.1.2-22)")
    properties = EMPTY
    if v5:
        properties, pos = decode_properties(buf, pos, end, CONNECT)
    client_id, pos = _read_string(buf, pos, end, "CONNECT client id")
    will = None
    if will_flag:
        will_properties = EMPTY
        if v5:
            will_properties, pos = decode_properties(buf, pos, end, WILL)
        will_topic, pos = _read_string(buf, pos, end, "CONNECT will topic")
        if "+" in will_topic or "#" in will_topic:
            raise MQTTProtocolError(
                f"will topic {will_topic!r} must not contain wildcards '+' or '#'",
                reason_code=reasons.TOPIC_NAME_INVALID,
            )
        will_payload, pos = _read_binary(buf, pos, end, "CONNECT will message")
        will = Will(
            topic=will_topic, payload=will_payload, qos=will_qos, retain=will_retain, properties=will_properties
        )
    username = None
    if username_flag:
        username, pos = _read_string(buf, pos, end, "CONNECT username")
    password = None
    if password_flag:
        password, pos = _read_binary(buf, pos, end, "CONNECT password")
    if pos != end:
        raise MQTTProtocolError(f"CONNECT has {end - pos} unexpected bytes after its payload")
    clean_session = bool(flags & 0x02)
    if not client_id:
        if level == PROTOCOL_LEVEL_31:
            raise MQTTProtocolError(
                "MQTT 3.1 requires a client id of 1 to 23 characters",
                reason_code=reasons.CLIENT_IDENTIFIER_NOT_VALID,
                connack_code=CONNACK_IDENTIFIER_REJECTED,
            )
        # MQTT 5 lets the server assign an id whatever the clean start flag (3.1.2.4).
        if not clean_session and not v5:
            raise MQTTProtocolError(
                "an empty client id requires clean session (MQTT-3.1.3-8)",
                reason_code=reasons.CLIENT_IDENTIFIER_NOT_VALID,
                connack_code=CONNACK_IDENTIFIER_REJECTED,
            )
    return Connect(
        protocol_name=name,
        protocol_level=level,
        clean_session=clean_session,
        keepalive=keepalive,
        client_id=client_id,
        will=will,
        username=username,
        password=password,
        properties=properties,
    )


def _decode_connack(first: int, buf: bytes, start: int, end: int) -> Connack:
    if end - start != 2:
        raise MQTTProtocolError(f"CONNACK remaining length must be 2, got {end - start}")
    ack_flags = buf[start]
    return_code = buf[start + 1]
    if ack_flags & 0xFE:
        raise MQTTProtocolError("CONNACK acknowledge flags bits 7-1 are reserved and must be 0 (MQTT-3.2.2-1)")
    if ack_flags and return_code:
        raise MQTTProtocolError("CONNACK refusing the connection must not set session present (MQTT-3.2.2-4)")
    return Connack(session_present=bool(ack_flags), reason_code=return_code)


def _decode_connack5(first: int, buf: bytes, start: int, end: int) -> Connack:
    if end - start < 2:
        raise MQTTProtocolError(f"CONNACK remaining length must be at least 2, got {end - start}")
    ack_flags = buf[start]
    reason_code = buf[start + 1]
    if ack_flags & 0xFE:
        raise MQTTProtocolError("CONNACK acknowledge flags bits 7-1 are reserved and must be 0 (MQTT-3.2.2-1)")
    if reason_code not in reasons.CONNACK_CODES:
        raise MQTTProtocolError(f"CONNACK reason code 0x{reason_code:02x} is not defined for CONNACK")
    if ack_flags and reason_code:
        raise MQTTProtocolError("CONNACK refusing the connection must not set session present (MQTT-3.2.2-6)")
    properties = EMPTY
    pos = start + 2
    if pos < end:
        properties, pos = decode_properties(buf, pos, end, CONNACK)
    if pos != end:
        raise MQTTProtocolError(f"CONNACK has {end - pos} unexpected bytes after its properties")
    return Connack(session_present=bool(ack_flags), reason_code=reason_code, properties=properties)


def _ack_decoder(kind: type[_Ack]) -> Callable[[int, bytes, int, int], Packet]:
    name = kind.__name__.upper()

    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end - start != 2:
            raise MQTTProtocolError(f"{name} remaining length must be 2, got {end - start}")
        return ack_from_wire(kind, _read_packet_id(buf, start, end, name))  # type: ignore[return-value]

    return decode


def _ack_decoder5(kind: type[_Ack], codes: frozenset[int], packet_kind: int) -> Callable[[int, bytes, int, int], Packet]:
    name = kind.__name__.upper()

    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end - start < 2:
            raise MQTTProtocolError(f"{name} remaining length must be at least 2, got {end - start}")
        packet_id = _read_packet_id(buf, start, end, name)
        if end - start == 2:
            return ack_from_wire(kind, packet_id)  # type: ignore[return-value]
        reason_code = buf[start + 2]
        if reason_code not in codes:
            raise MQTTProtocolError(f"{name} reason code 0x{reason_code:02x} is not defined for {name}")
        properties = EMPTY
        if end - start > 3:
            properties, pos = decode_properties(buf, start + 3, end, packet_kind)
            if pos != end:
                raise MQTTProtocolError(f"{name} has {end - pos} unexpected bytes after its properties")
        return ack_from_wire(kind, packet_id, reason_code, properties)  # type: ignore[return-value]

    return decode


def _options(byte: int, v5: bool) -> SubscriptionOptions:
    if not v5:
        if byte > 2:
            raise MQTTProtocolError(
                f"SUBSCRIBE requested QoS byte 0x{byte:02x} is invalid: must be 0, 1 or 2 (MQTT-3.8.3-4)"
            )
        return QOS_OPTIONS[byte]
    if byte < 3:
        return QOS_OPTIONS[byte]
    if byte & 0xC0:
        raise MQTTProtocolError(f"SUBSCRIBE options byte 0x{byte:02x} sets reserved bits 6-7 (MQTT-3.8.3-5)")
    if byte & 3 == 3:
        raise MQTTProtocolError(f"SUBSCRIBE options byte 0x{byte:02x} requests QoS 3 (MQTT-3.8.3-4)")
    retain_handling = byte >> 4 & 3
    if retain_handling == 3:
        raise MQTTProtocolError(
            f"SUBSCRIBE options byte 0x{byte:02x} has retain handling 3 (MQTT-3.8.3-5)",
            reason_code=reasons.PROTOCOL_ERROR,
        )
    return SubscriptionOptions(byte & 3, bool(byte & 0x04), bool(byte & 0x08), retain_handling)


def _subscribe_decoder(v5: bool) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        packet_id = _read_packet_id(buf, start, end, "SUBSCRIBE")
        pos = start + 2
        properties = EMPTY
        if v5:
            properties, pos = decode_properties(buf, pos, end, SUBSCRIBE)
        topics = []
        while pos < end:
            topic_filter, pos = _read_string(buf, pos, end, "SUBSCRIBE topic filter")
            if pos >= end:
                raise MQTTProtocolError("SUBSCRIBE topic filter is missing its requested QoS byte")
            topics.append((topic_filter, _options(buf[pos], v5)))
            pos += 1
        if not topics:
            raise MQTTProtocolError("SUBSCRIBE carries no topic filter (MQTT-3.8.3-3)", reason_code=reasons.PROTOCOL_ERROR)
        return Subscribe(packet_id=packet_id, topics=tuple(topics), properties=properties)

    return decode


def _suback_decoder(v5: bool) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        packet_id = _read_packet_id(buf, start, end, "SUBACK")
        pos = start + 2
        properties = EMPTY
        if v5:
            properties, pos = decode_properties(buf, pos, end, SUBACK)
        codes = tuple(buf[pos:end])
        if not codes:
            raise MQTTProtocolError("SUBACK carries no return code")
        for code in codes:
            if (code not in reasons.SUBACK_CODES) if v5 else (code > 2 and code != SUBACK_FAILURE):
                raise MQTTProtocolError(f"SUBACK return code 0x{code:02x} is reserved (MQTT-3.9.3-2)")
        return Suback(packet_id=packet_id, reason_codes=codes, properties=properties)

    return decode


def _unsubscribe_decoder(v5: bool) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        packet_id = _read_packet_id(buf, start, end, "UNSUBSCRIBE")
        pos = start + 2
        properties = EMPTY
        if v5:
            properties, pos = decode_properties(buf, pos, end, UNSUBSCRIBE)
        topics = []
        while pos < end:
            topic_filter, pos = _read_string(buf, pos, end, "UNSUBSCRIBE topic filter")
            topics.append(topic_filter)
        if not topics:
            raise MQTTProtocolError(
                "UNSUBSCRIBE carries no topic filter (MQTT-3.10.3-2)", reason_code=reasons.PROTOCOL_ERROR
            )
        return Unsubscribe(packet_id=packet_id, topics=tuple(topics), properties=properties)

    return decode


def _decode_unsuback4(buf: bytes, start: int, end: int) -> Unsuback:
    if end - start != 2:
        raise MQTTProtocolError(f"UNSUBACK remaining length must be 2, got {end - start}")
    return Unsuback(_read_packet_id(buf, start, end, "UNSUBACK"))


def _decode_unsuback5(first: int, buf: bytes, start: int, end: int) -> Unsuback:
    packet_id = _read_packet_id(buf, start, end, "UNSUBACK")
    properties, pos = decode_properties(buf, start + 2, end, UNSUBACK)
    codes = tuple(buf[pos:end])
    if not codes:
        raise MQTTProtocolError("UNSUBACK carries no reason code")
    for code in codes:
        if code not in reasons.UNSUBACK_CODES:
            raise MQTTProtocolError(f"UNSUBACK reason code 0x{code:02x} is not defined for UNSUBACK")
    return Unsuback(packet_id, codes, properties)


def _reason_decoder5(
    make: Callable[[int, Properties], Packet], kind: int, codes: frozenset[int]
) -> Callable[[int, bytes, int, int], Packet]:
    """DISCONNECT and AUTH: an optional reason code (0 when absent), then optional properties."""
    name = NAMES[kind]
    normal = make(0, EMPTY)

    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end == start:
            return normal
        reason_code = buf[start]
        if reason_code not in codes:
            raise MQTTProtocolError(f"{name} reason code 0x{reason_code:02x} is not defined for {name}")
        properties = EMPTY
        if end - start > 1:
            properties, pos = decode_properties(buf, start + 1, end, kind)
            if pos != end:
                raise MQTTProtocolError(f"{name} has {end - pos} unexpected bytes after its properties")
        return make(reason_code, properties)

    return decode


_PINGREQ = Pingreq()
_PINGRESP = Pingresp()
_DISCONNECT = Disconnect()


def _empty_decoder(name: str, packet: Packet) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end != start:
            raise MQTTProtocolError(f"{name} remaining length must be 0, got {end - start}")
        return packet

    return decode


# PUBLISH and PUBACK are decoded inline in the parse loops.
_DECODERS4: dict[int, Callable[[int, bytes, int, int], Packet]] = {
    CONNECT: _decode_connect,
    CONNACK: _decode_connack,
    PUBREC: _ack_decoder(Pubrec),
    PUBREL: _ack_decoder(Pubrel),
    PUBCOMP: _ack_decoder(Pubcomp),
    SUBSCRIBE: _subscribe_decoder(False),
    SUBACK: _suback_decoder(False),
    UNSUBSCRIBE: _unsubscribe_decoder(False),
    UNSUBACK: lambda first, buf, start, end: _decode_unsuback4(buf, start, end),
    PINGREQ: _empty_decoder("PINGREQ", _PINGREQ),
    PINGRESP: _empty_decoder("PINGRESP", _PINGRESP),
    DISCONNECT: _empty_decoder("DISCONNECT", _DISCONNECT),
}

_DECODERS5: dict[int, Callable[[int, bytes, int, int], Packet]] = {
    CONNECT: _decode_connect,
    CONNACK: _decode_connack5,
    PUBACK: _ack_decoder5(Puback, reasons.PUBACK_CODES, PUBACK),
    PUBREC: _ack_decoder5(Pubrec, reasons.PUBREC_CODES, PUBREC),
    PUBREL: _ack_decoder5(Pubrel, reasons.PUBREL_CODES, PUBREL),
    PUBCOMP: _ack_decoder5(Pubcomp, reasons.PUBCOMP_CODES, PUBCOMP),
    SUBSCRIBE: _subscribe_decoder(True),
    SUBACK: _suback_decoder(True),
    UNSUBSCRIBE: _unsubscribe_decoder(True),
    UNSUBACK: _decode_unsuback5,
    PINGREQ: _empty_decoder("PINGREQ", _PINGREQ),
    PINGRESP: _empty_decoder("PINGRESP", _PINGRESP),
    DISCONNECT: _reason_decoder5(
        lambda code, props: Disconnect(reason_code=code, properties=props), DISCONNECT, reasons.DISCONNECT_CODES
    ),
    AUTH: _reason_decoder5(lambda code, props: Auth(reason_code=code, properties=props), AUTH, reasons.AUTH_CODES),
}


class MQTTDecoder:
    """Turns a byte stream into packets; one instance per connection.

    Use `packets(data)` once per read (feeds and drains in one call), or
    `feed(data)` then `next_packet()` until it returns None. After an error
    every call raises it again: the connection is over.

    `version` is the wire format (4: 3.1.1 and 3.1, 5: MQTT 5); a CONNECT
    sets it to the CONNECT's. `accept` is the table of first bytes taken
    now (by default every well-formed one of the version); an owner that
    keeps a connection's state narrows it, and `on_control` (called after
    each CONNECT, DISCONNECT and AUTH) lets it change the table between two
    packets of one read; when it returns True the decoder stops and drops
    every later byte (the peer said goodbye). A first byte the version allows
    but `accept` does not raises `refuse(packet type)`.
    """

    __slots__ = (
        "max_packet_size",
        "version",
        "accept",
        "on_control",
        "refuse",
        "check_publish",
        "_buf",
        "_pos",
        "_more",
        "_need",
        "_error",
        "_ready",
        "_done",
        "_last_raw",
        "_last_topic",
    )

    def __init__(self, max_packet_size: int = MAX_REMAINING_LENGTH, version: int = PROTOCOL_LEVEL_311) -> None:
        if not 0 <= max_packet_size <= MAX_REMAINING_LENGTH:
            raise ValueError(f"max_packet_size must be 0..{MAX_REMAINING_LENGTH}, got {max_packet_size!r}")
        if version not in VALID_FIRST_BYTES:
            raise ValueError(f"version must be 4 (3.1.1) or 5, got {version!r}")
        #: Largest remaining length accepted; checked from the fixed header alone.
        self.max_packet_size = max_packet_size
        self.version = version
        self.accept: bytes = VALID_FIRST_BYTES[version]
        self.on_control: Callable[[Packet], bool] | None = None
        self.refuse: Callable[[int], MQTTProtocolError] | None = None
        #: Called with each MQTT 5 PUBLISH's properties when it has any (the owner's rules on them).
        self.check_publish: Callable[[Properties], None] | None = None
        # Invariant: `_buf` is empty or holds unparsed bytes from `_pos` on;
        # `_more` holds later bytes, only when `_buf` is not empty. A bytearray,
        # so a packet trickling in as many tiny reads costs no per-read object.
        self._buf = b""
        self._pos = 0
        self._more = bytearray()
        # Bytes from `_pos` the next packet needs; 0 while its header is incomplete.
        self._need = 0
        self._error: MQTTProtocolError | None = None
        self._ready: deque[Packet] = deque()
        self._done = False
        # The last PUBLISH topic, wire bytes and decoded (b"" decodes to "").
        self._last_raw = b""
        self._last_topic = ""

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial packet)."""
        return len(self._buf) - self._pos + len(self._more)

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            self._raise_again()
        if data and not self._done:
            self._append(data)

    def next_packet(self) -> Packet | None:
        """The next whole packet, or None when more data is needed."""
        if not self._ready:
            if self._error is not None:
                self._raise_again()
            try:
                self._ready.extend(self._drain())
            except MQTTProtocolError as exc:
                # Packets before the error are still handed out, one per call.
                self._ready.extend(exc.decoded)
                exc.decoded = ()
                if not self._ready:
                    raise
        return self._ready.popleft() if self._ready else None

    def packets(self, data: bytes) -> list[Packet]:
        """Feed `data` and return every packet it completes.

        On a protocol error the packets decoded before it in this call are in
        the exception's `decoded` attribute.
        """
        if self._error is not None:
            self._raise_again()
        if self._buf or self._ready or self._done:
            if data and not self._done:
                self._append(data)
            ready = list(self._ready)
            self._ready.clear()
            try:
                drained = self._drain()
            except MQTTProtocolError as exc:
                exc.decoded = (*ready, *exc.decoded)
                raise
            return ready + drained if ready else drained
        # Fast path: nothing pending, parse the chunk in place.
        if data.__class__ is not bytes:
            data = bytes(data)
        out: list[Packet] = []
        try:
            pos = self._parse(data, 0, out)
        except MQTTProtocolError as exc:
            self._fail(exc, out)
            raise
        if pos != len(data):
            self._buf = data
            self._pos = pos
        return out

    def _append(self, data: bytes) -> None:
        if data.__class__ is not bytes:
            data = bytes(data)
        if self._buf:
            self._more += data
        else:
            self._buf = data
            self._pos = 0

    def _drain(self) -> list[Packet]:
        buf = self._buf
        if not buf:
            return []
        pos = self._pos
        more = self._more
        if more:
            if len(buf) - pos + len(more) < self._need:
                return []
            buf = b"".join((buf[pos:] if pos else buf, more))
            pos = 0
            more.clear()
        out: list[Packet] = []
        try:
            pos = self._parse(buf, pos, out)
        except MQTTProtocolError as exc:
            self._fail(exc, out)
            raise
        if pos == len(buf):
            self._buf = b""
            self._pos = 0
        else:
            self._buf = buf
            self._pos = pos
        return out

    def _fail(self, exc: MQTTProtocolError, decoded: list[Packet]) -> None:
        exc.decoded = tuple(decoded)
        self._error = exc
        self._buf = b""
        self._pos = 0
        self._more.clear()

    def _raise_again(self) -> None:
        error = self._error
        assert error is not None
        # A fresh exception: re-raising the first one would hand out its
        # `decoded` packets twice.
        raise error.again()

    def _refused(self, first: int) -> MQTTProtocolError:
        if not VALID_FIRST_BYTES[self.version][first]:
            return _first_byte_error(first, self.version)
        kind = first >> 4
        if self.refuse is not None:
            return self.refuse(kind)
        return MQTTProtocolError(f"unexpected {NAMES[kind]}", reason_code=reasons.PROTOCOL_ERROR)

    def _control(self, packet: Packet) -> bool:
        """Before a CONNECT, DISCONNECT, AUTH or SUBSCRIBE goes out: the version may change, and the
        owner's state; the owner may refuse the packet (raise). True: it ends the stream."""
        if packet.__class__ is Connect:
            level = packet.protocol_level  # type: ignore[union-attr]
            self.version = PROTOCOL_LEVEL_5 if level == PROTOCOL_LEVEL_5 else PROTOCOL_LEVEL_311
            if self.on_control is None:
                self.accept = VALID_FIRST_BYTES[self.version]
        if self.on_control is not None and self.on_control(packet):
            self._done = True
            return True
        return False

    def _stop(self, end_of_data: int) -> int:
        self._need = 0
        self._buf = b""
        self._pos = 0
        self._more.clear()
        return end_of_data

    def _parse(self, buf: bytes, pos: int, out: list[Packet]) -> int:
        """Decode whole packets from `buf[pos:]` into `out`; return where parsing stopped."""
        if self._done:
            return self._stop(len(buf))
        if self.version == PROTOCOL_LEVEL_5:
            return self._parse5(buf, pos, out)
        end_of_data = len(buf)
        max_size = self.max_packet_size
        valid_first = self.accept
        topic_names = _topic_names
        last_raw = self._last_raw
        last_topic = self._last_topic
        append = out.append
        while pos < end_of_data:
            first = buf[pos]
            if not valid_first[first]:
                raise self._refused(first)
            if pos + 1 == end_of_data:
                self._need = 0
                break
            length = buf[pos + 1]
            if length < 0x80:
                start = pos + 2
            elif pos + 2 < end_of_data and buf[pos + 2] < 0x80:
                # Two length bytes (128 B to 16 KiB): inline, it is every mid-sized PUBLISH.
                length = (length & 0x7F) | buf[pos + 2] << 7
                start = pos + 3
            else:
                length, start = _read_remaining_length(buf, pos + 1, end_of_data, max_size)
                if not start:
                    self._need = 0
                    break
            if length > max_size:
                raise _oversize(length, max_size)
            end = start + length
            if end > end_of_data:
                self._need = end - pos
                break
            kind = first >> 4
            if kind == PUBLISH:
                if length < 2:
                    raise MQTTProtocolError("PUBLISH ends inside its topic length")
                topic_length = buf[start] << 8 | buf[start + 1]
                topic_end = start + 2 + topic_length
                if topic_end > end:
                    raise MQTTProtocolError("PUBLISH topic runs past the end of the packet")
                # A publisher mostly repeats its last topic: compare in place, no slice.
                if topic_length == len(last_raw) and buf.startswith(last_raw, start + 2):
                    topic = last_topic
                else:
                    raw_topic = buf[start + 2 : topic_end]
                    cached = topic_names.get(raw_topic)
                    topic = cached if cached is not None else _decode_topic_name(raw_topic)
                    last_raw = self._last_raw = raw_topic
                    last_topic = self._last_topic = topic
                if first & 0x06:
                    if topic_end + 2 > end:
                        raise MQTTProtocolError("PUBLISH: packet ends inside the packet id")
                    packet_id = buf[topic_end] << 8 | buf[topic_end + 1]
                    if not packet_id:
                        raise MQTTProtocolError("PUBLISH has packet id 0; it must be 1..65535 (MQTT-2.3.1-1)")
                    append(
                        publish_from_wire(
                            topic,
                            buf[topic_end + 2 : end],
                            (first >> 1) & 3,
                            first & 1 == 1,
                            first & 8 == 8,
                            packet_id,
                        )
                    )
                else:
                    append(publish_from_wire(topic, buf[topic_end:end], 0, first & 1 == 1, False, None))
            elif kind == PUBACK:
                if length != 2:
                    raise MQTTProtocolError(f"PUBACK remaining length must be 2, got {length}")
                packet_id = buf[start] << 8 | buf[start + 1]
                if not packet_id:
                    raise MQTTProtocolError("PUBACK has packet id 0; it must be 1..65535 (MQTT-2.3.1-1)")
                append(puback_from_wire(packet_id))
            elif kind == CONNECT:
                if connect_level(buf, start, end) == PROTOCOL_LEVEL_5:
                    # Errors in the rest of this CONNECT are answered in v5's form.
                    self.version = PROTOCOL_LEVEL_5
                packet = _decode_connect(first, buf, start, end)
                stop = self._control(packet)
                append(packet)
                if stop:
                    return self._stop(end_of_data)
                if self.version == PROTOCOL_LEVEL_5:
                    return self._parse5(buf, end, out)
                valid_first = self.accept
            else:
                control = _DECODERS4[kind](first, buf, start, end)
                if kind in _CONTROL:
                    stop = self._control(control)
                    append(control)
                    if stop:
                        return self._stop(end_of_data)
                    valid_first = self.accept
                else:
                    append(control)
            pos = end
        else:
            self._need = 0
        return pos

    def _parse5(self, buf: bytes, pos: int, out: list[Packet]) -> int:
        """`_parse` for MQTT 5: PUBLISH carries properties, acknowledgements may carry reason codes."""
        end_of_data = len(buf)
        max_size = self.max_packet_size
        valid_first = self.accept
        topic_names = _topic_names
        last_raw = self._last_raw
        last_topic = self._last_topic
        append = out.append
        decoders = _DECODERS5
        while pos < end_of_data:
            first = buf[pos]
            if not valid_first[first]:
                raise self._refused(first)
            if pos + 1 == end_of_data:
                self._need = 0
                break
            length = buf[pos + 1]
            if length < 0x80:
                start = pos + 2
            elif pos + 2 < end_of_data and buf[pos + 2] < 0x80:
                length = (length & 0x7F) | buf[pos + 2] << 7
                start = pos + 3
            else:
                length, start = _read_remaining_length(buf, pos + 1, end_of_data, max_size)
                if not start:
                    self._need = 0
                    break
            if length > max_size:
                raise _oversize(length, max_size)
            end = start + length
            if end > end_of_data:
                self._need = end - pos
                break
            kind = first >> 4
            if kind == PUBLISH:
                if length < 2:
                    raise MQTTProtocolError("PUBLISH ends inside its topic length")
                topic_length = buf[start] << 8 | buf[start + 1]
                topic_end = start + 2 + topic_length
                if topic_end > end:
                    raise MQTTProtocolError("PUBLISH topic runs past the end of the packet")
                if topic_length == len(last_raw) and buf.startswith(last_raw, start + 2):
                    topic = last_topic
                else:
                    raw_topic = buf[start + 2 : topic_end]
                    cached = topic_names.get(raw_topic)
                    topic = cached if cached is not None else _decode_topic_name(raw_topic)
                    last_raw = self._last_raw = raw_topic
                    last_topic = self._last_topic = topic
                packet_id: int | None = None
                if first & 0x06:
                    if topic_end + 2 > end:
                        raise MQTTProtocolError("PUBLISH: packet ends inside the packet id")
                    packet_id = buf[topic_end] << 8 | buf[topic_end + 1]
                    if not packet_id:
                        raise MQTTProtocolError("PUBLISH has packet id 0; it must be 1..65535 (MQTT-2.3.1-1)")
                    topic_end += 2
                if topic_end >= end:
                    raise MQTTProtocolError("PUBLISH ends before its property length")
                if buf[topic_end] == 0:
                    # No properties: the common case, one byte.
                    append(publish_from_wire(
                        topic, buf[topic_end + 1 : end], (first >> 1) & 3, first & 1 == 1, first & 8 == 8, packet_id
                    ))
                else:
                    properties, payload_start = decode_properties(buf, topic_end, end, PUBLISH)
                    if self.check_publish is not None:
                        self.check_publish(properties)
                    append(publish_from_wire(
                        topic, buf[payload_start:end], (first >> 1) & 3, first & 1 == 1, first & 8 == 8, packet_id,
                        properties,
                    ))
            elif kind == PUBACK and length == 2:
                packet_id = buf[start] << 8 | buf[start + 1]
                if not packet_id:
                    raise MQTTProtocolError("PUBACK has packet id 0; it must be 1..65535 (MQTT-2.3.1-1)")
                append(puback_from_wire(packet_id))
            else:
                packet = decoders[kind](first, buf, start, end)
                if kind in _CONTROL:
                    stop = self._control(packet)
                    append(packet)
                    if stop:
                        return self._stop(end_of_data)
                    if self.version != PROTOCOL_LEVEL_5:
                        # A second CONNECT (of another version) on a stream whose owner allows it.
                        return self._parse(buf, end, out)
                    valid_first = self.accept
                else:
                    append(packet)
            pos = end
        else:
            self._need = 0
        return pos


def decode_packet(data: bytes, version: int = PROTOCOL_LEVEL_311) -> Packet:
    """Decode exactly one whole packet (tests and tools; connections use `MQTTDecoder`)."""
    decoder = MQTTDecoder(version=version)
    packets = decoder.packets(bytes(data))
    if len(packets) != 1 or decoder.buffered:
        raise MQTTProtocolError(
            f"expected exactly one whole packet, got {len(packets)} and {decoder.buffered} spare bytes"
        )
    return packets[0]


# --------------------------------------------------------------------------- encoding

_SHORT_LENGTHS = tuple(bytes((n,)) for n in range(0x80))

PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"
DISCONNECT_BYTES = b"\xe0\x00"
#: An MQTT 5 AUTH with reason 0 and no properties may be sent as two bytes (3.15.2.1).
AUTH_SUCCESS_BYTES = b"\xf0\x00"


def encode_remaining_length(length: int) -> bytes:
    """The fixed header's variable-length integer (1 to 4 bytes)."""
    if length < 0x80:
        if length < 0:
            raise ValueError(f"remaining length must not be negative, got {length}")
        return _SHORT_LENGTHS[length]
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {length} bytes exceeds MQTT's limit of {MAX_REMAINING_LENGTH} bytes")
    return encode_varint(length)


def _fixed_header(first: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((first, length))
    return bytes((first,)) + encode_remaining_length(length)


def _encode_string(text: str, what: str = "string") -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes in UTF-8; MQTT strings hold at most {MAX_STRING_BYTES}")
    return _pack_packet_id(len(raw)) + raw


def _encode_binary(data: bytes, what: str) -> bytes:
    if len(data) > MAX_STRING_BYTES:
        raise ValueError(f"{what} is {len(data)} bytes; MQTT binary fields hold at most {MAX_STRING_BYTES}")
    return _pack_packet_id(len(data)) + data


def _v4_only(kind: str, properties: Properties, reason_code: int = 0) -> None:
    """3.1.1 has no properties and no reason codes: refuse to write what would be lost."""
    if properties:
        raise ValueError(f"MQTT 3.1.1 {kind} cannot carry properties")
    if reason_code:
        raise ValueError(f"MQTT 3.1.1 {kind} cannot carry reason code 0x{reason_code:02x}")


def encode_topic(topic: str) -> bytes:
    """A topic as it appears on the wire (length prefix + UTF-8); cached when short."""
    wire = _topic_wire.get(topic)
    if wire is None:
        wire = _encode_string(topic, "topic")
        if len(wire) <= _TOPIC_CACHE_MAX_BYTES:
            if len(_topic_wire) >= _TOPIC_CACHE_ENTRIES:
                _topic_wire.clear()
            _topic_wire[topic] = wire
    return wire


#: encode_packet_id(packet_id): two bytes, big-endian; what differs between copies of one
#: QoS 1/2 PUBLISH (3.1.1). The struct's own pack: one C call per delivery.
encode_packet_id: Callable[[int], bytes] = _pack_packet_id


def encode_packet_id5(packet_id: int) -> bytes:
    """MQTT 5: the packet id and an empty property length, what sits between a PUBLISH head and its payload."""
    return _pack_packet_id5(packet_id, 0)


def encode_publish_head(
    topic: str, payload_length: int, qos: int = 0, retain: bool = False, dup: bool = False,
    version: int = PROTOCOL_LEVEL_311,
) -> bytes:
    """A PUBLISH up to its packet id (QoS 1/2) or its payload (QoS 0): fixed header and topic.

    `head + encode_packet_id(pid) + payload` (QoS 1/2) or `head + payload`
    (QoS 0) is `encode_publish(...)`, so a broker can build the head once per
    message and flag combination, reuse it for every subscriber that gets the
    same flags, and hand the payload to the transport without copying it
    into a packet first. MQTT 5 (no properties): the same with
    `encode_packet_id5`, and a QoS 0 head ends with the empty property length.
    """
    if payload_length < 0:
        raise ValueError(f"payload length must not be negative, got {payload_length}")
    wire_topic = _topic_wire.get(topic)
    if wire_topic is None:
        wire_topic = encode_topic(topic)
    v5 = version == PROTOCOL_LEVEL_5
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
        first = 0x3A if dup else 0x32
        if qos == 2:
            first += 2
        length = len(wire_topic) + 2 + payload_length
        if v5:
            length += 1
    elif dup:
        raise ValueError("a QoS 0 PUBLISH has no DUP flag (MQTT-3.3.1-2)")
    else:
        first = 0x30
        length = len(wire_topic) + payload_length
        if v5:
            length += 1
            wire_topic += b"\x00"
    if retain:
        first |= 0x01
    if length < 0x80:
        return bytes((first, length)) + wire_topic
    return _fixed_header(first, length) + wire_topic


def encode_publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
) -> bytes:
    """A 3.1.1 PUBLISH."""
    wire_topic = _topic_wire.get(topic)
    if wire_topic is None:
        wire_topic = encode_topic(topic)
    first = 0x31 if retain else 0x30
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
        if packet_id is None or not 0 < packet_id < 0x10000:
            raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        first |= qos << 1
        if dup:
            first |= 0x08
        length = len(wire_topic) + 2 + len(payload)
        header = bytes((first, length)) if length < 0x80 else _fixed_header(first, length)
        return b"".join((header, wire_topic, _pack_packet_id(packet_id), payload))
    if packet_id is not None or dup:
        raise ValueError("a QoS 0 PUBLISH has no packet id and no DUP flag")
    length = len(wire_topic) + len(payload)
    header = bytes((first, length)) if length < 0x80 else _fixed_header(first, length)
    return b"".join((header, wire_topic, payload))


def encode_publish5(
    topic: str,
    payload: bytes,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
    properties: Properties = EMPTY,
) -> bytes:
    """An MQTT 5 PUBLISH: the 3.1.1 layout with the properties between packet id and payload."""
    wire_topic = _topic_wire.get(topic)
    if wire_topic is None:
        wire_topic = encode_topic(topic)
    first = 0x31 if retain else 0x30
    props = encode_properties(properties, PUBLISH) if properties else b"\x00"
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
        if packet_id is None or not 0 < packet_id < 0x10000:
            raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        first |= qos << 1
        if dup:
            first |= 0x08
        length = len(wire_topic) + 2 + len(props) + len(payload)
        return b"".join((_fixed_header(first, length), wire_topic, _pack_packet_id(packet_id), props, payload))
    if packet_id is not None or dup:
        raise ValueError("a QoS 0 PUBLISH has no packet id and no DUP flag")
    length = len(wire_topic) + len(props) + len(payload)
    return b"".join((_fixed_header(first, length), wire_topic, props, payload))


class PublishTemplate:
    """One message encoded once for every subscriber it goes to (of one protocol version).

    At QoS 0 `encode(0)` returns the same bytes object for every call. At QoS
    1/2 copies differ only in the packet id: `header(qos)` is everything
    before it (fixed header and topic), so a session may write
    `header(qos) + packet_id_bytes(pid) + payload`, or call `encode(qos, pid)`.
    Retain defaults to False: a message delivered to an established
    subscription carries RETAIN 0 (MQTT-3.3.1-9).
    """

    __slots__ = ("topic", "payload", "retain", "version", "packet_id_bytes", "_wire_topic", "_headers", "_qos0")

    def __init__(self, topic: str, payload: bytes, retain: bool = False, version: int = PROTOCOL_LEVEL_311) -> None:
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self.version = version
        #: The packet id as it follows `header()`: with the empty property length in MQTT 5.
        self.packet_id_bytes = encode_packet_id5 if version == PROTOCOL_LEVEL_5 else encode_packet_id
        self._wire_topic = encode_topic(topic)
        # Index qos | dup << 2: at most six distinct headers per message.
        self._headers: list[bytes | None] = [None] * 7
        self._qos0: bytes | None = None
        if len(self._wire_topic) + 3 + len(payload) > MAX_REMAINING_LENGTH:
            raise ValueError(f"PUBLISH of {len(payload)} bytes exceeds MQTT's packet size limit")

    def header(self, qos: int, dup: bool = False) -> bytes:
        """Fixed header and topic: the bytes before the packet id (or the payload at QoS 0)."""
        if not 0 <= qos <= 2 or (dup and not qos):
            raise ValueError(f"no PUBLISH has QoS {qos!r} with DUP {dup!r}")
        index = qos | 4 if dup else qos
        head = self._headers[index]
        if head is None:
            head = self._headers[index] = encode_publish_head(
                self.topic, len(self.payload), qos, self.retain, dup, self.version
            )
        return head

    def encode(self, qos: int = 0, packet_id: int | None = None, dup: bool = False) -> bytes:
        if not qos:
            packet = self._qos0
            if packet is None:
                packet = self._qos0 = self.header(0) + self.payload
            return packet
        if packet_id is None or not 0 < packet_id < 0x10000:
            raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        return b"".join((self.header(qos, dup), self.packet_id_bytes(packet_id), self.payload))


def encode_puback(packet_id: int) -> bytes:
    """PUBACK, success: the same four bytes in 3.1.1 and MQTT 5."""
    return _pack_ack(0x40, 2, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    return _pack_ack(0x50, 2, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    return _pack_ack(0x62, 2, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    return _pack_ack(0x70, 2, packet_id)


def encode_unsuback(packet_id: int) -> bytes:
    """A 3.1.1 UNSUBACK."""
    return _pack_ack(0xB0, 2, packet_id)


def encode_connack(session_present: bool, return_code: int) -> bytes:
    """A 3.1.1 CONNACK."""
    if session_present and return_code:
        raise ValueError("CONNACK refusing the connection must not set session present (MQTT-3.2.2-4)")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def encode_suback(packet_id: int, return_codes: Iterable[int]) -> bytes:
    """A 3.1.1 SUBACK."""
    body = _pack_packet_id(packet_id) + bytes(return_codes)
    return _fixed_header(0x90, len(body)) + body


_ACK_FIRST = {Puback: 0x40, Pubrec: 0x50, Pubrel: 0x62, Pubcomp: 0x70}


def _encode_ack5(packet: _Ack) -> bytes:
    first = _ACK_FIRST[type(packet)]
    if not packet.properties:
        if not packet.reason_code:
            return _pack_ack(first, 2, packet.packet_id)
        return bytes((first, 3)) + _pack_packet_id(packet.packet_id) + bytes((packet.reason_code,))
    body = b"".join((
        _pack_packet_id(packet.packet_id),
        bytes((packet.reason_code,)),
        encode_properties(packet.properties, first >> 4),
    ))
    return _fixed_header(first, len(body)) + body


def encode_connect(packet: Connect) -> bytes:
    """CONNECT in the form of its own protocol level (5: with properties and will properties)."""
    v5 = packet.protocol_level == PROTOCOL_LEVEL_5
    if not v5:
        _v4_only("CONNECT", packet.properties)
        if packet.will is not None:
            _v4_only("will", packet.will.properties)
    flags = 0x02 if packet.clean_session else 0
    parts = [
        _encode_string(packet.protocol_name, "protocol name"),
        b"",  # level, flags and keepalive, filled in below
    ]
    if v5:
        parts.append(encode_properties(packet.properties, CONNECT))
    parts.append(_encode_string(packet.client_id, "client id"))
    will = packet.will
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        if v5:
            parts.append(encode_properties(will.properties, WILL))
        parts.append(_encode_string(will.topic, "will topic"))
        parts.append(_encode_binary(will.payload, "will message"))
    if packet.username is not None:
        flags |= 0x80
        parts.append(_encode_string(packet.username, "username"))
    if packet.password is not None:
        flags |= 0x40
        parts.append(_encode_binary(packet.password, "password"))
    parts[1] = bytes((packet.protocol_level, flags)) + _pack_packet_id(packet.keepalive)
    body = b"".join(parts)
    return _fixed_header(0x10, len(body)) + body


def encode_subscribe(packet: Subscribe, version: int = PROTOCOL_LEVEL_311) -> bytes:
    v5 = version == PROTOCOL_LEVEL_5
    if not v5:
        _v4_only("SUBSCRIBE", packet.properties)
        for topic_filter, options in packet.topics:
            if not options.v4_only:
                raise ValueError(f"MQTT 3.1.1 SUBSCRIBE cannot carry the options of {topic_filter!r} beyond its QoS")
    body = b"".join((
        _pack_packet_id(packet.packet_id),
        encode_properties(packet.properties, SUBSCRIBE) if v5 else b"",
        *(_encode_string(topic_filter, "topic filter") + bytes((options.to_byte(),))
          for topic_filter, options in packet.topics),
    ))
    return _fixed_header(0x82, len(body)) + body


def encode_unsubscribe(packet: Unsubscribe, version: int = PROTOCOL_LEVEL_311) -> bytes:
    v5 = version == PROTOCOL_LEVEL_5
    if not v5:
        _v4_only("UNSUBSCRIBE", packet.properties)
    body = b"".join((
        _pack_packet_id(packet.packet_id),
        encode_properties(packet.properties, UNSUBSCRIBE) if v5 else b"",
        *(_encode_string(topic_filter, "topic filter") for topic_filter in packet.topics),
    ))
    return _fixed_header(0xA2, len(body)) + body


def _encode_reason_packet(first: int, kind: int, reason_code: int, properties: Properties) -> bytes:
    """DISCONNECT and AUTH in MQTT 5: as short as the spec allows."""
    if not properties:
        if not reason_code:
            return bytes((first, 0))
        return bytes((first, 1, reason_code))
    body = bytes((reason_code,)) + encode_properties(properties, kind)
    return _fixed_header(first, len(body)) + body


def _encode5(packet: Packet) -> bytes:
    match packet:
        case Publish():
            return encode_publish5(
                packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id,
                packet.properties,
            )
        case Puback() | Pubrec() | Pubrel() | Pubcomp():
            return _encode_ack5(packet)
        case Connect():
            return encode_connect(packet)
        case Connack():
            body = bytes((1 if packet.session_present else 0, packet.reason_code)) + encode_properties(
                packet.properties, CONNACK
            )
            return _fixed_header(0x20, len(body)) + body
        case Subscribe():
            return encode_subscribe(packet, PROTOCOL_LEVEL_5)
        case Suback():
            body = b"".join((
                _pack_packet_id(packet.packet_id),
                encode_properties(packet.properties, SUBACK),
                bytes(packet.reason_codes),
            ))
            return _fixed_header(0x90, len(body)) + body
        case Unsubscribe():
            return encode_unsubscribe(packet, PROTOCOL_LEVEL_5)
        case Unsuback():
            if not packet.reason_codes:
                raise ValueError("an MQTT 5 UNSUBACK needs one reason code per filter of its UNSUBSCRIBE")
            body = b"".join((
                _pack_packet_id(packet.packet_id),
                encode_properties(packet.properties, UNSUBACK),
                bytes(packet.reason_codes),
            ))
            return _fixed_header(0xB0, len(body)) + body
        case Pingreq():
            return PINGREQ_BYTES
        case Pingresp():
            return PINGRESP_BYTES
        case Disconnect():
            return _encode_reason_packet(0xE0, DISCONNECT, packet.reason_code, packet.properties)
        case Auth():
            return _encode_reason_packet(0xF0, AUTH, packet.reason_code, packet.properties)
    raise TypeError(f"not an MQTT packet: {type(packet).__name__}")


def encode(packet: Packet, version: int = PROTOCOL_LEVEL_311) -> bytes:
    """The wire bytes of any packet in `version`'s form (a CONNECT always in its own level's)."""
    if version == PROTOCOL_LEVEL_5:
        return _encode5(packet)
    match packet:
        case Publish():
            _v4_only("PUBLISH", packet.properties)
            return encode_publish(
                packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id
            )
        case Puback() | Pubrec() | Pubrel() | Pubcomp():
            _v4_only(type(packet).__name__.upper(), packet.properties, packet.reason_code)
            return _pack_ack(_ACK_FIRST[type(packet)], 2, packet.packet_id)
        case Connect():
            return encode_connect(packet)
        case Connack():
            _v4_only("CONNACK", packet.properties)
            return encode_connack(packet.session_present, packet.reason_code)
        case Subscribe():
            return encode_subscribe(packet)
        case Suback():
            _v4_only("SUBACK", packet.properties)
            for code in packet.reason_codes:
                if code > 2 and code != SUBACK_FAILURE:
                    raise ValueError(f"MQTT 3.1.1 SUBACK return codes are 0, 1, 2 or 0x80, got 0x{code:02x}")
            return encode_suback(packet.packet_id, packet.reason_codes)
        case Unsubscribe():
            return encode_unsubscribe(packet)
        case Unsuback():
            _v4_only("UNSUBACK", packet.properties)
            if packet.reason_codes:
                raise ValueError("MQTT 3.1.1 UNSUBACK carries no reason codes")
            return encode_unsuback(packet.packet_id)
        case Pingreq():
            return PINGREQ_BYTES
        case Pingresp():
            return PINGRESP_BYTES
        case Disconnect():
            _v4_only("DISCONNECT", packet.properties, packet.reason_code)
            return DISCONNECT_BYTES
        case Auth():
            raise ValueError("AUTH is an MQTT 5 packet; 3.1.1 has none")
    raise TypeError(f"not an MQTT packet: {type(packet).__name__}")
