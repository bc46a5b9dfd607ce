"""Sans-IO MQTT 3.1.1 codec: bytes in, packets out; packets in, bytes out.

The decoder checks every rule of the specification a server must enforce on
the wire (reserved flags, string encoding, packet ids, lengths) and leaves
policy (topic filter syntax, limits, authorization, the session state machine)
to the session. PUBLISH and PUBACK, the packets of the hot path, are decoded
inline in the parse loop; everything else goes through a per-type function.

Buffering: the decoder keeps the unconsumed tail of the last chunk as an
immutable `bytes` plus an offset, so a read that holds whole packets (the
usual case) is parsed in place and a PUBLISH costs one copy, its payload
slice. Reads that cannot complete the pending packet (its size is known from
the fixed header) are only appended to a bytearray, so a large packet arriving
in many reads is joined once instead of once per read.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable

from gateway.mqtt.packets import (
    CONNACK,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    CONNECT,
    DISCONNECT,
    MAX_REMAINING_LENGTH,
    MAX_STRING_BYTES,
    PINGREQ,
    PINGRESP,
    PROTOCOL_LEVEL_31,
    PROTOCOL_LEVEL_311,
    PROTOCOL_NAME_31,
    PROTOCOL_NAME_311,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBACK_FAILURE,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
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
    Unsuback,
    Unsubscribe,
    Will,
    puback_from_wire,
    publish_from_wire,
)

_PACKET_ID = struct.Struct(">H")
_ACK = struct.Struct(">BBH")
_pack_packet_id = _PACKET_ID.pack
_pack_ack = _ACK.pack

_NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}
#: Packet types whose fixed-header flags are fixed at 0b0010 (MQTT-3.6.1-1, 3.8.1-1, 3.10.1-1).
_FLAGS_0010 = frozenset((PUBREL, SUBSCRIBE, UNSUBSCRIBE))

# Topic names are cached by their wire bytes: a publisher repeats a few topics,
# and the cached str keeps its hash, which the router's dict lookups reuse.
# Bounded in entry count and entry size so hostile topics cannot grow it.
_TOPIC_CACHE_ENTRIES = 4096
_TOPIC_CACHE_MAX_BYTES = 256
_topic_names: dict[bytes, str] = {}
_topic_wire: dict[str, bytes] = {}


# --------------------------------------------------------------------------- decoding


def _first_byte_ok(first: int) -> bool:
    kind, flags = first >> 4, first & 0x0F
    if kind == PUBLISH:
        qos = (flags >> 1) & 3
        return qos != 3 and not (qos == 0 and flags & 0x08)
    if kind in _FLAGS_0010:
        return flags == 0b0010
    return kind in _NAMES and flags == 0


_VALID_FIRST = bytes(_first_byte_ok(byte) for byte in range(256))


def _first_byte_error(first: int) -> MQTTProtocolError:
    kind, flags = first >> 4, first & 0x0F
    if kind not in _NAMES:
        return MQTTProtocolError(f"packet type {kind} is reserved (first byte 0x{first:02x})")
    if kind == PUBLISH:
        if (flags >> 1) & 3 == 3:
            return MQTTProtocolError("PUBLISH with QoS 3 is not allowed (MQTT-3.3.1-4)")
        return MQTTProtocolError("PUBLISH with QoS 0 must not set the DUP flag (MQTT-3.3.1-2)")
    expected = 0b0010 if kind in _FLAGS_0010 else 0
    return MQTTProtocolError(
        f"{_NAMES[kind]} fixed-header flags must be 0b{expected:04b}, got 0b{flags:04b} (MQTT-2.2.2-2)"
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
    return MQTTProtocolError(f"packet of {length} bytes exceeds the maximum packet size of {max_size} bytes")


def _decode_topic_name(raw: bytes) -> str:
    """A PUBLISH or will topic: strict UTF-8, no NUL, no wildcards; cached when short."""
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MQTTProtocolError("topic name is not valid UTF-8 (MQTT-1.5.3-1)") from None
    if "\x00" in topic:
        raise MQTTProtocolError("topic name contains U+0000 (MQTT-1.5.3-2)")
    if "+" in topic or "#" in topic:
        raise MQTTProtocolError(f"topic name {topic!r} must not contain wildcards '+' or '#' (MQTT-3.3.2-2)")
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


def _decode_connect(first: int, buf: bytes, start: int, end: int) -> Connect:
    name, pos = _read_string(buf, start, end, "CONNECT protocol name")
    if pos + 4 > end:
        raise MQTTProtocolError("CONNECT variable header is truncated")
    level = buf[pos]
    flags = buf[pos + 1]
    keepalive = buf[pos + 2] << 8 | buf[pos + 3]
    pos += 4
    # The level is checked before anything else: another version's CONNECT
    # (MQTT 5 adds properties) cannot be parsed further, yet deserves CONNACK 1.
    if name == PROTOCOL_NAME_311:
        if level != PROTOCOL_LEVEL_311:
            raise MQTTProtocolError(
                f"unsupported MQTT protocol level {level}: this server speaks 3.1.1 (level 4) and 3.1 (MQTT-3.1.2-2)",
                connack_code=CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            )
    elif name == PROTOCOL_NAME_31:
        if level != PROTOCOL_LEVEL_31:
            raise MQTTProtocolError(
                f"unsupported MQIsdp protocol level {level}: MQTT 3.1 is level 3",
                connack_code=CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
            )
    else:
        raise MQTTProtocolError(f"unknown protocol name {name!r}: expected 'MQTT' (MQTT-3.1.2-1)")
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
    client_id, pos = _read_string(buf, pos, end, "CONNECT client id")
    will = None
    if will_flag:
        will_topic, pos = _read_string(buf, pos, end, "CONNECT will topic")
        if "+" in will_topic or "#" in will_topic:
            raise MQTTProtocolError(f"will topic {will_topic!r} must not contain wildcards '+' or '#'")
        will_payload, pos = _read_binary(buf, pos, end, "CONNECT will message")
        will = Will(topic=will_topic, payload=will_payload, qos=will_qos, retain=will_retain)
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
                "MQTT 3.1 requires a client id of 1 to 23 characters", connack_code=CONNACK_IDENTIFIER_REJECTED
            )
        if not clean_session:
            raise MQTTProtocolError(
                "an empty client id requires clean session (MQTT-3.1.3-8)", connack_code=CONNACK_IDENTIFIER_REJECTED
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
    return Connack(session_present=bool(ack_flags), return_code=return_code)


def _ack_decoder(name: str, make: Callable[[int], Packet]) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end - start != 2:
            raise MQTTProtocolError(f"{name} remaining length must be 2, got {end - start}")
        return make(_read_packet_id(buf, start, end, name))

    return decode


def _decode_subscribe(first: int, buf: bytes, start: int, end: int) -> Subscribe:
    packet_id = _read_packet_id(buf, start, end, "SUBSCRIBE")
    pos = start + 2
    topics = []
    while pos < end:
        topic_filter, pos = _read_string(buf, pos, end, "SUBSCRIBE topic filter")
        if pos >= end:
            raise MQTTProtocolError("SUBSCRIBE topic filter is missing its requested QoS byte")
        qos = buf[pos]
        if qos > 2:
            raise MQTTProtocolError(
                f"SUBSCRIBE requested QoS byte 0x{qos:02x} is invalid: must be 0, 1 or 2 (MQTT-3.8.3-4)"
            )
        topics.append((topic_filter, qos))
        pos += 1
    if not topics:
        raise MQTTProtocolError("SUBSCRIBE carries no topic filter (MQTT-3.8.3-3)")
    return Subscribe(packet_id=packet_id, topics=tuple(topics))


def _decode_suback(first: int, buf: bytes, start: int, end: int) -> Suback:
    packet_id = _read_packet_id(buf, start, end, "SUBACK")
    codes = tuple(buf[start + 2 : end])
    if not codes:
        raise MQTTProtocolError("SUBACK carries no return code")
    for code in codes:
        if code > 2 and code != SUBACK_FAILURE:
            raise MQTTProtocolError(f"SUBACK return code 0x{code:02x} is reserved (MQTT-3.9.3-2)")
    return Suback(packet_id=packet_id, return_codes=codes)


def _decode_unsubscribe(first: int, buf: bytes, start: int, end: int) -> Unsubscribe:
    packet_id = _read_packet_id(buf, start, end, "UNSUBSCRIBE")
    pos = start + 2
    topics = []
    while pos < end:
        topic_filter, pos = _read_string(buf, pos, end, "UNSUBSCRIBE topic filter")
        topics.append(topic_filter)
    if not topics:
        raise MQTTProtocolError("UNSUBSCRIBE carries no topic filter (MQTT-3.10.3-2)")
    return Unsubscribe(packet_id=packet_id, topics=tuple(topics))


_PINGREQ = Pingreq()
_PINGRESP = Pingresp()
_DISCONNECT = Disconnect()


def _empty_decoder(name: str, packet: Packet) -> Callable[[int, bytes, int, int], Packet]:
    def decode(first: int, buf: bytes, start: int, end: int) -> Packet:
        if end != start:
            raise MQTTProtocolError(f"{name} remaining length must be 0, got {end - start}")
        return packet

    return decode


# PUBLISH and PUBACK are decoded inline in `MQTTDecoder._parse`.
_DECODERS: dict[int, Callable[[int, bytes, int, int], Packet]] = {
    CONNECT: _decode_connect,
    CONNACK: _decode_connack,
    PUBREC: _ack_decoder("PUBREC", Pubrec),
    PUBREL: _ack_decoder("PUBREL", Pubrel),
    PUBCOMP: _ack_decoder("PUBCOMP", Pubcomp),
    SUBSCRIBE: _decode_subscribe,
    SUBACK: _decode_suback,
    UNSUBSCRIBE: _decode_unsubscribe,
    UNSUBACK: _ack_decoder("UNSUBACK", Unsuback),
    PINGREQ: _empty_decoder("PINGREQ", _PINGREQ),
    PINGRESP: _empty_decoder("PINGRESP", _PINGRESP),
    DISCONNECT: _empty_decoder("DISCONNECT", _DISCONNECT),
}


class MQTTDecoder:
    """Turns a byte stream into packets; one instance per connection.

    Use `packets(data)` once per read (feeds and drains in one call), or
    `feed(data)` then `next_packet()` until it returns None. After an error
    every call raises it again: the connection is over.
    """

    __slots__ = (
        "max_packet_size",
        "_buf",
        "_pos",
        "_more",
        "_need",
        "_error",
        "_ready",
        "_last_raw",
        "_last_topic",
    )

    def __init__(self, max_packet_size: int = MAX_REMAINING_LENGTH) -> None:
        if not 0 <= max_packet_size <= MAX_REMAINING_LENGTH:
            raise ValueError(f"max_packet_size must be 0..{MAX_REMAINING_LENGTH}, got {max_packet_size!r}")
        #: Largest remaining length accepted; checked from the fixed header alone.
        self.max_packet_size = max_packet_size
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
        if data:
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
        if self._buf or self._ready:
            if data:
                self._append(data)
            ready = list(self._ready)
            self._ready.clear()
            try:
                out = self._drain()
            except MQTTProtocolError as exc:
                exc.decoded = (*ready, *exc.decoded)
                raise
            return ready + out if ready else out
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
        raise MQTTProtocolError(str(error), connack_code=error.connack_code)

    def _parse(self, buf: bytes, pos: int, out: list[Packet]) -> int:
        """Decode whole packets from `buf[pos:]` into `out`; return where parsing stopped."""
        end_of_data = len(buf)
        max_size = self.max_packet_size
        valid_first = _VALID_FIRST
        topic_names = _topic_names
        last_raw = self._last_raw
        last_topic = self._last_topic
        append = out.append
        while pos < end_of_data:
            first = buf[pos]
            if not valid_first[first]:
                raise _first_byte_error(first)
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
                    topic = topic_names.get(raw_topic)
                    if topic is None:
                        topic = _decode_topic_name(raw_topic)
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
            else:
                append(_DECODERS[kind](first, buf, start, end))
            pos = end
        else:
            self._need = 0
        return pos


def decode_packet(data: bytes) -> Packet:
    """Decode exactly one whole packet (tests and tools; sessions use `MQTTDecoder`)."""
    decoder = MQTTDecoder()
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


def encode_remaining_length(length: int) -> bytes:
    """The fixed header's variable-length integer (1 to 4 bytes)."""
    if length < 0x80:
        if length < 0:
            raise ValueError(f"remaining length must not be negative, got {length}")
        return _SHORT_LENGTHS[length]
    if length > MAX_REMAINING_LENGTH:
        raise ValueError(f"packet body of {length} bytes exceeds MQTT's limit of {MAX_REMAINING_LENGTH} bytes")
    out = bytearray()
    while length >= 0x80:
        out.append((length & 0x7F) | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


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


def encode_packet_id(packet_id: int) -> bytes:
    """Two bytes, big-endian; what differs between copies of one QoS 1/2 PUBLISH."""
    return _pack_packet_id(packet_id)


def encode_publish_head(
    topic: str, payload_length: int, qos: int = 0, retain: bool = False, dup: bool = False
) -> bytes:
    """A PUBLISH up to its packet id (QoS 1/2) or its payload (QoS 0): fixed header and topic.

    `head + encode_packet_id(pid) + payload` (QoS 1/2) or `head + payload`
    (QoS 0) is `encode_publish(...)`, so a broker can build the head once per
    message and flag combination, reuse it for every subscriber that gets the
    same flags, and hand the payload to the transport without copying it
    into a packet first.
    """
    if payload_length < 0:
        raise ValueError(f"payload length must not be negative, got {payload_length}")
    wire_topic = _topic_wire.get(topic)
    if wire_topic is None:
        wire_topic = encode_topic(topic)
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"PUBLISH QoS must be 0, 1 or 2, got {qos!r}")
        first = 0x3A if dup else 0x32
        if qos == 2:
            first += 2
        length = len(wire_topic) + 2 + payload_length
    elif dup:
        raise ValueError("a QoS 0 PUBLISH has no DUP flag (MQTT-3.3.1-2)")
    else:
        first = 0x30
        length = len(wire_topic) + payload_length
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


class PublishTemplate:
    """One message encoded once for every subscriber it goes to.

    At QoS 0 `encode(0)` returns the same bytes object for every call. At QoS
    1/2 copies differ only in the packet id: `header(qos)` is everything
    before it (fixed header and topic), so a session may write
    `header(qos) + encode_packet_id(pid) + payload`, or call `encode(qos, pid)`.
    Retain defaults to False: a message delivered to an established
    subscription carries RETAIN 0 (MQTT-3.3.1-9).
    """

    __slots__ = ("topic", "payload", "retain", "_wire_topic", "_headers", "_qos0")

    def __init__(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.topic = topic
        self.payload = payload
        self.retain = retain
        self._wire_topic = encode_topic(topic)
        # Index qos | dup << 2: at most six distinct headers per message.
        self._headers: list[bytes | None] = [None] * 7
        self._qos0: bytes | None = None
        if len(self._wire_topic) + 2 + len(payload) > MAX_REMAINING_LENGTH:
            raise ValueError(f"PUBLISH of {len(payload)} bytes exceeds MQTT's packet size limit")

    def header(self, qos: int, dup: bool = False) -> bytes:
        """Fixed header and topic: the bytes before the packet id (or the payload at QoS 0)."""
        if not 0 <= qos <= 2 or (dup and not qos):
            raise ValueError(f"no PUBLISH has QoS {qos!r} with DUP {dup!r}")
        index = qos | 4 if dup else qos
        head = self._headers[index]
        if head is None:
            first = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if self.retain else 0)
            length = len(self._wire_topic) + len(self.payload) + (2 if qos else 0)
            head = self._headers[index] = _fixed_header(first, length) + self._wire_topic
        return head

    def encode(self, qos: int = 0, packet_id: int | None = None, dup: bool = False) -> bytes:
        if not qos:
            packet = self._qos0
            if packet is None:
                packet = self._qos0 = self.header(0) + self.payload
            return packet
        if packet_id is None or not 0 < packet_id < 0x10000:
            raise ValueError(f"a QoS {qos} PUBLISH needs a packet id 1..65535, got {packet_id!r}")
        return b"".join((self.header(qos, dup), _pack_packet_id(packet_id), self.payload))


def encode_puback(packet_id: int) -> bytes:
    return _pack_ack(0x40, 2, packet_id)


def encode_pubrec(packet_id: int) -> bytes:
    return _pack_ack(0x50, 2, packet_id)


def encode_pubrel(packet_id: int) -> bytes:
    return _pack_ack(0x62, 2, packet_id)


def encode_pubcomp(packet_id: int) -> bytes:
    return _pack_ack(0x70, 2, packet_id)


def encode_unsuback(packet_id: int) -> bytes:
    return _pack_ack(0xB0, 2, packet_id)


def encode_connack(session_present: bool, return_code: int) -> bytes:
    if session_present and return_code:
        raise ValueError("CONNACK refusing the connection must not set session present (MQTT-3.2.2-4)")
    return bytes((0x20, 2, 1 if session_present else 0, return_code))


def encode_suback(packet_id: int, return_codes: Iterable[int]) -> bytes:
    body = _pack_packet_id(packet_id) + bytes(return_codes)
    return _fixed_header(0x90, len(body)) + body


def encode_connect(packet: Connect) -> bytes:
    flags = 0x02 if packet.clean_session else 0
    parts = [
        _encode_string(packet.protocol_name, "protocol name"),
        b"",  # level, flags and keepalive, filled in below
        _encode_string(packet.client_id, "client id"),
    ]
    will = packet.will
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
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


def encode_subscribe(packet: Subscribe) -> bytes:
    body = _pack_packet_id(packet.packet_id) + b"".join(
        _encode_string(topic_filter, "topic filter") + bytes((qos,)) for topic_filter, qos in packet.topics
    )
    return _fixed_header(0x82, len(body)) + body


def encode_unsubscribe(packet: Unsubscribe) -> bytes:
    body = _pack_packet_id(packet.packet_id) + b"".join(
        _encode_string(topic_filter, "topic filter") for topic_filter in packet.topics
    )
    return _fixed_header(0xA2, len(body)) + body


def encode(packet: Packet) -> bytes:
    """The wire bytes of any packet (the hot path has its own functions above)."""
    match packet:
        case Publish():
            return encode_publish(
                packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id
            )
        case Puback():
            return encode_puback(packet.packet_id)
        case Pubrec():
            return encode_pubrec(packet.packet_id)
        case Pubrel():
            return encode_pubrel(packet.packet_id)
        case Pubcomp():
            return encode_pubcomp(packet.packet_id)
        case Connect():
            return encode_connect(packet)
        case Connack():
            return encode_connack(packet.session_present, packet.return_code)
        case Subscribe():
            return encode_subscribe(packet)
        case Suback():
            return encode_suback(packet.packet_id, packet.return_codes)
        case Unsubscribe():
            return encode_unsubscribe(packet)
        case Unsuback():
            return encode_unsuback(packet.packet_id)
        case Pingreq():
            return PINGREQ_BYTES
        case Pingresp():
            return PINGRESP_BYTES
        case Disconnect():
            return DISCONNECT_BYTES
    raise TypeError(f"not an MQTT packet: {type(packet).__name__}")
