"""Sans-IO AMQP 0.9.1 framing on pamqp: bytes in, events out; frames in, bytes out.

`FrameDecoder.feed(data)` checks the protocol header, splits the stream into
frames (7-byte header, payload, frame-end 0xCE), enforces `frame_max`, and
assembles `basic.publish` with its content header and body frames into one
`Publish` event. pamqp decodes the rare methods; the hot ones (basic.publish,
content headers, basic.ack in; basic.deliver, basic.ack out) are written by
hand because pamqp spends 4-7 us on each (LIBRARIES.md), and the unit tests
pin them against pamqp's own encoding (property tests, both directions).

A publish whose header and single body frame arrived in the same read as its
method (what every client sends for a small message) is decoded in one step,
with the exchange and routing key of recent publishes remembered by their raw
bytes. A publisher that repeats itself (same channel, exchange, key,
properties and body size: telemetry) sends the same bytes up to the body
every time, so the decoder keeps that prefix of the last such publish and
recognises a repeat with one comparison. Anything else takes the general
frame-by-frame path, which gives the same events and the same errors.

A broken stream raises `FramingError` (sticky: every later `feed` raises it
again) carrying the events decoded before the fault, so the connection can
act on what arrived intact and then close with the error's reply code.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import commands, frame as pamqp_frame, header as pamqp_header
from pamqp.base import Frame as Method

from gateway.errors import ProtocolError

#: The only protocol header this server speaks; any other is answered with it.
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
#: Frames every peer must accept before tuning (spec: frame-min-size).
FRAME_MIN_SIZE = 4096
#: What the server proposes in Connection.Tune (RabbitMQ's default).
FRAME_MAX = 131072
#: Bytes of partly received message bodies one connection may hold, all its channels together:
#: this many of the largest allowed bodies, and at least MIN_PENDING_CONTENT. One channel never
#: reaches it; without it, a client (even before it logs in) could start a publish on each of
#: 65535 channels and have the gateway buffer that many bodies.
PENDING_BODIES = 8
MIN_PENDING_CONTENT = 8 * 1024 * 1024
#: Frame header (type, channel, size) plus the frame-end octet.
FRAME_OVERHEAD = 8
FRAME_END = 0xCE

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8

HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"

# Reply codes (AMQP 0.9.1 section 1.2; "soft" close a channel, "hard" a connection).
REPLY_SUCCESS = 200
CONTENT_TOO_LARGE = 311
NO_ROUTE = 312
NO_CONSUMERS = 313
CONNECTION_FORCED = 320
INVALID_PATH = 402
ACCESS_REFUSED = 403
NOT_FOUND = 404
RESOURCE_LOCKED = 405
PRECONDITION_FAILED = 406
FRAME_ERROR = 501
SYNTAX_ERROR = 502
COMMAND_INVALID = 503
CHANNEL_ERROR = 504
UNEXPECTED_FRAME = 505
RESOURCE_ERROR = 506
NOT_ALLOWED = 530
NOT_IMPLEMENTED = 540
INTERNAL_ERROR = 541

REPLY_NAMES = {
    REPLY_SUCCESS: "OK",
    CONTENT_TOO_LARGE: "CONTENT_TOO_LARGE",
    NO_ROUTE: "NO_ROUTE",
    NO_CONSUMERS: "NO_CONSUMERS",
    CONNECTION_FORCED: "CONNECTION_FORCED",
    INVALID_PATH: "INVALID_PATH",
    ACCESS_REFUSED: "ACCESS_REFUSED",
    NOT_FOUND: "NOT_FOUND",
    RESOURCE_LOCKED: "RESOURCE_LOCKED",
    PRECONDITION_FAILED: "PRECONDITION_FAILED",
    FRAME_ERROR: "FRAME_ERROR",
    SYNTAX_ERROR: "SYNTAX_ERROR",
    COMMAND_INVALID: "COMMAND_INVALID",
    CHANNEL_ERROR: "CHANNEL_ERROR",
    UNEXPECTED_FRAME: "UNEXPECTED_FRAME",
    RESOURCE_ERROR: "RESOURCE_ERROR",
    NOT_ALLOWED: "NOT_ALLOWED",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    INTERNAL_ERROR: "INTERNAL_ERROR",
}

#: Basic.Properties with no flag set, and with only delivery-mode 2 (persistent).
PROPERTIES_NONE = b"\x00\x00"
PROPERTIES_PERSISTENT = b"\x10\x00\x02"
_DELIVERY_MODE_ONLY = 0x1000

_BASIC = 60
_PUBLISH_ID = 0x003C0028
_ACK_ID = 0x003C0050
_GET_OK_ID = 0x003C0047
_RETURN_ID = 0x003C0032

_frame_header = struct.Struct(">BHI")
_class_method = struct.Struct(">HH")
_method_index = struct.Struct(">I")
_header_fields = struct.Struct(">HHQ")
#: A content header frame up to its property list: type, channel, size, class, weight, body size.
_content_header_frame = struct.Struct(">BHIHHQ")
#: The end octet of one frame and the header of the next.
_end_and_frame_header = struct.Struct(">BBHI")
#: The end octet of one frame, then a content header frame up to its property list.
_end_and_content_header = struct.Struct(">BBHIHHQ")
_u16 = struct.Struct(">H")
_deliver_fixed = struct.Struct(">QB")
_ack_payload = struct.Struct(">IQB")
_get_ok_fixed = struct.Struct(">IQB")


def reply_text(reply_code: int, detail: str) -> str:
    """RabbitMQ's form, "ACCESS_REFUSED - detail", cut to fit a short string."""
    text = f"{REPLY_NAMES.get(reply_code, str(reply_code))} - {detail}"
    encoded = text.encode("utf-8")
    if len(encoded) <= 255:
        return text
    return encoded[:252].decode("utf-8", "ignore") + "..."


class AMQPError(ProtocolError):
    """An error the peer is told about with a reply code (and the method that caused it)."""

    def __init__(self, reply_code: int, detail: str, *, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(detail)
        self.reply_code = reply_code
        self.detail = detail
        self.class_id = class_id
        self.method_id = method_id

    @property
    def reply_text(self) -> str:
        return reply_text(self.reply_code, self.detail)


class ChannelError(AMQPError):
    """A soft error: the channel is closed, the connection stays."""


class ConnectionLevelError(AMQPError):
    """A hard error: the connection is closed."""


class FramingError(ConnectionLevelError):
    """The byte stream is broken. `events` holds what was decoded intact before the fault;
    `bad_header` means the peer did not open with our protocol header (answer with it)."""

    def __init__(self, reply_code: int, detail: str, *, events: list[object] | None = None,
                 bad_header: bool = False) -> None:
        super().__init__(reply_code, detail)
        self.events: list[object] = events if events is not None else []
        self.bad_header = bad_header


# -- events --------------------------------------------------------------------------------------


class ProtocolHeaderReceived:
    """The peer opened with `AMQP 0-9-1`; the server answers with Connection.Start."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ProtocolHeaderReceived()"


PROTOCOL_HEADER_RECEIVED = ProtocolHeaderReceived()


class MethodFrame:
    """Any method pamqp decoded, on its channel."""

    __slots__ = ("channel", "method")

    def __init__(self, channel: int, method: Method) -> None:
        self.channel = channel
        self.method = method

    def __repr__(self) -> str:
        return f"MethodFrame({self.channel}, {self.method.name})"


class UnknownMethod:
    """A method id this protocol version does not define (the server answers 540)."""

    __slots__ = ("channel", "class_id", "method_id")

    def __init__(self, channel: int, class_id: int, method_id: int) -> None:
        self.channel = channel
        self.class_id = class_id
        self.method_id = method_id

    def __repr__(self) -> str:
        return f"UnknownMethod({self.channel}, {self.class_id}, {self.method_id})"


class Ack:
    """basic.ack from the client (the consumer hot path, decoded by hand)."""

    __slots__ = ("channel", "delivery_tag", "multiple")

    def __init__(self, channel: int, delivery_tag: int, multiple: bool) -> None:
        self.channel = channel
        self.delivery_tag = delivery_tag
        self.multiple = multiple

    def __repr__(self) -> str:
        return f"Ack({self.channel}, {self.delivery_tag}, multiple={self.multiple})"


class Publish:
    """basic.publish with its whole content. One is built per message: a plain
    slotted class, because a frozen dataclass costs twice as much to build.

    `properties` is the raw property list (flags and values) exactly as the
    publisher sent it, so it travels to consumers without being re-encoded.
    """

    __slots__ = ("channel", "exchange", "routing_key", "mandatory", "immediate", "properties", "body", "persistent")

    def __init__(self, channel: int, exchange: str, routing_key: str, mandatory: bool, immediate: bool,
                 properties: bytes, body: bytes, persistent: bool) -> None:
        self.channel = channel
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.immediate = immediate
        self.properties = properties
        self.body = body
        self.persistent = persistent

    def __repr__(self) -> str:
        return (f"Publish({self.channel}, {self.exchange!r}, {self.routing_key!r}, mandatory={self.mandatory}, "
                f"{len(self.body)} bytes)")


class ContentTooLarge:
    """A content header announced a body over the limit; its body frames are skipped."""

    __slots__ = ("channel", "body_size")

    def __init__(self, channel: int, body_size: int) -> None:
        self.channel = channel
        self.body_size = body_size

    def __repr__(self) -> str:
        return f"ContentTooLarge({self.channel}, {self.body_size})"


class _Content:
    """A basic.publish whose header/body frames are still arriving."""

    __slots__ = ("exchange", "routing_key", "mandatory", "immediate", "properties", "persistent",
                 "body_size", "received", "chunks", "have_header", "skip")

    def __init__(self, exchange: str, routing_key: str, mandatory: bool, immediate: bool) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.immediate = immediate
        self.properties = PROPERTIES_NONE
        self.persistent = False
        self.body_size = 0
        self.received = 0
        self.chunks: list[bytes] = []
        self.have_header = False
        self.skip = False


# -- decoding ------------------------------------------------------------------------------------


def _short_str(data: bytes, offset: int) -> tuple[str, int]:
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise ValueError("short string runs past the end of the frame")
    return data[offset + 1:end].decode("utf-8"), end


def _decode_publish(payload: bytes) -> tuple[str, str, bool, bool]:
    # class, method (4), ticket (2), exchange, routing key, bits.
    exchange, offset = _short_str(payload, 6)
    routing_key, offset = _short_str(payload, offset)
    if offset + 1 != len(payload):
        raise ValueError("basic.publish has a wrong length")
    bits = payload[offset]
    return exchange, routing_key, bool(bits & 1), bool(bits & 2)


def decode_properties(raw: bytes) -> commands.Basic.Properties:
    """The Basic.Properties of a raw property list (flags and values); ValueError when malformed."""
    try:
        offset, flags = pamqp_header.ContentHeader._get_flags(raw)
        properties = commands.Basic.Properties()
        properties.unmarshal(flags, raw[offset:])
    except Exception as exc:  # pamqp raises struct/Index/Key/Type errors on hostile input
        raise ValueError(f"malformed content properties: {exc}") from exc
    return properties


def _persistent(raw: bytes) -> bool:
    """Validate the property list and say whether delivery-mode is 2."""
    if raw == PROPERTIES_NONE:
        return False
    if len(raw) == 3 and _u16.unpack_from(raw)[0] == _DELIVERY_MODE_ONLY:
        return raw[2] == 2
    return decode_properties(raw).delivery_mode == 2


#: basic.publish argument blocks (raw bytes -> decoded) one decoder remembers: a publisher uses a
#: handful of keys, and a gateway holds many connections.
PUBLISH_ARGS_CACHE_SIZE = 16


class _RepeatedPublish:
    """The last publish decoded whole: its bytes from the method frame up to the body,
    and what they decoded to. Built only from frames the full path validated."""

    __slots__ = ("prefix", "size", "body_size", "channel", "args", "properties", "persistent")

    def __init__(self, prefix: bytes, body_size: int, channel: int, args: tuple[str, str, bool, bool],
                 properties: bytes, persistent: bool) -> None:
        self.prefix = prefix
        self.size = len(prefix)
        self.body_size = body_size
        self.channel = channel
        self.args = args
        self.properties = properties
        self.persistent = persistent


class FrameDecoder:
    """Bytes in, events out. `frame_max` may be lowered once the connection is tuned."""

    def __init__(self, *, max_body_size: int, frame_max: int = FRAME_MAX) -> None:
        self._frame_max = frame_max
        self.max_body_size = max_body_size
        self.max_pending = max(MIN_PENDING_CONTENT, PENDING_BODIES * max_body_size)
        #: Body bytes of unfinished publishes held now (all channels).
        self._pending_bytes = 0
        self._tail = b""
        self._header_done = False
        self._content: dict[int, _Content] = {}
        self._error: FramingError | None = None
        #: Publishers repeat their exchange and routing key: decode each block once.
        self._publish_args: dict[bytes, tuple[str, str, bool, bool]] = {}
        self._repeat: _RepeatedPublish | None = None

    @property
    def frame_max(self) -> int:
        return self._frame_max

    @frame_max.setter
    def frame_max(self, value: int) -> None:
        self._frame_max = value
        # The remembered publish was checked against the old limit.
        self._repeat = None

    @property
    def header_received(self) -> bool:
        return self._header_done

    def feed(self, data: bytes) -> list[object]:
        if self._error is not None:
            raise self._error
        if self._tail:
            data = self._tail + data
            self._tail = b""
        events: list[object] = []
        try:
            self._parse(data, events)
        except FramingError as exc:
            exc.events = events
            self._error = exc
            self._tail = b""
            raise
        return events

    def _fail(self, reply_code: int, detail: str) -> FramingError:
        return FramingError(reply_code, detail)

    def _parse(self, data: bytes, events: list[object]) -> None:
        pos = 0
        if not self._header_done:
            got = data[:8]
            if PROTOCOL_HEADER[:len(got)] != got:
                raise FramingError(FRAME_ERROR, f"unsupported protocol header {got!r}", bad_header=True)
            if len(data) < 8:
                self._tail = data
                return
            self._header_done = True
            events.append(PROTOCOL_HEADER_RECEIVED)
            pos = 8
        end_of_data = len(data)
        max_payload = self._frame_max - FRAME_OVERHEAD
        content = self._content
        while end_of_data - pos >= 7:
            repeat = self._repeat
            if repeat is not None and not content and data.startswith(repeat.prefix, pos):
                # The previous publish again, up to its body: only the body and its end octet are new.
                body_start = pos + repeat.size
                end = body_start + repeat.body_size
                if end < end_of_data and data[end] == FRAME_END:
                    events.append(Publish(repeat.channel, *repeat.args, repeat.properties, data[body_start:end],
                                          repeat.persistent))
                    pos = end + 1
                    continue
            frame_type, channel, size = _frame_header.unpack_from(data, pos)
            if size > max_payload:
                raise self._fail(FRAME_ERROR, f"frame of {size + FRAME_OVERHEAD} bytes exceeds frame_max {self.frame_max}")
            start = pos + 7
            end = start + size
            if end >= end_of_data:
                break
            if data[end] != FRAME_END:
                raise self._fail(FRAME_ERROR, "frame does not end with 0xCE (truncated or corrupt frame)")
            pos = end + 1
            if frame_type == FRAME_METHOD:
                if channel in content:
                    raise self._fail(UNEXPECTED_FRAME, f"method frame on channel {channel} while its content was expected")
                if size < 4:
                    raise self._fail(FRAME_ERROR, "method frame too short")
                index = _method_index.unpack_from(data, start)[0]
                if index == _PUBLISH_ID:
                    payload = data[start:end]
                    args = self._publish_args.get(payload)
                    if args is None:
                        args = self._decode_publish_args(payload)
                    whole_end = self._whole_publish(data, start - 7, pos, channel, args, max_payload, events)
                    if whole_end:
                        pos = whole_end
                    else:
                        content[channel] = _Content(*args)
                elif index == _ACK_ID:
                    if size != 13:
                        raise self._fail(SYNTAX_ERROR, "malformed basic.ack")
                    _, tag, bits = _ack_payload.unpack_from(data, start)
                    events.append(Ack(channel, tag, (bits & 1) == 1))
                else:
                    events.append(self._decode_method(channel, index, data[start:end]))
            elif frame_type == FRAME_HEADER:
                self._content_header(channel, data[start:end], events)
            elif frame_type == FRAME_BODY:
                payload = data[start:end]
                pending = content.get(channel)
                if pending is None or not pending.have_header:
                    raise self._fail(UNEXPECTED_FRAME, f"body frame on channel {channel} without a content header")
                pending.received += size
                if pending.received > pending.body_size:
                    raise self._fail(FRAME_ERROR, "body frames longer than their content header said")
                if not pending.skip:
                    self._pending_bytes += size
                    if self._pending_bytes > self.max_pending:
                        raise self._fail(RESOURCE_ERROR, f"more than {self.max_pending} bytes of unfinished messages "
                                         "on this connection's channels")
                    pending.chunks.append(payload)
                if pending.received == pending.body_size:
                    del content[channel]
                    if not pending.skip:
                        self._pending_bytes -= pending.received
                        chunks = pending.chunks
                        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                        events.append(Publish(channel, pending.exchange, pending.routing_key, pending.mandatory,
                                              pending.immediate, pending.properties, body, pending.persistent))
            elif frame_type == FRAME_HEARTBEAT:
                if channel != 0 or size != 0:
                    raise self._fail(FRAME_ERROR, "heartbeat frame must be empty and on channel 0")
            else:
                raise self._fail(FRAME_ERROR, f"unknown frame type {frame_type}")
        if pos < end_of_data:
            self._tail = data[pos:]

    def _decode_publish_args(self, payload: bytes) -> tuple[str, str, bool, bool]:
        try:
            args = _decode_publish(payload)
        except (ValueError, IndexError) as exc:
            raise self._fail(SYNTAX_ERROR, f"malformed basic.publish: {exc}") from None
        cache = self._publish_args
        if len(cache) >= PUBLISH_ARGS_CACHE_SIZE:
            cache.clear()
        cache[payload] = args
        return args

    def _whole_publish(self, data: bytes, method_start: int, pos: int, channel: int,
                       args: tuple[str, str, bool, bool], max_payload: int, events: list[object]) -> int:
        """The content header and one body frame right after a basic.publish (its method frame
        starts at `method_start`, the header at `pos`), when they are complete and valid: append
        the Publish and return the position after them. Otherwise 0, and the general path
        decodes the same frames (and reports any fault) one by one."""
        properties_start = pos + 19
        if len(data) < properties_start:
            return 0
        frame_type, header_channel, size, class_id, weight, body_size = _content_header_frame.unpack_from(data, pos)
        if (frame_type != FRAME_HEADER or header_channel != channel or class_id != _BASIC or weight or size < 14
                or size > max_payload or body_size > self.max_body_size):
            return 0
        header_end = pos + 7 + size
        raw = data[properties_start:header_end]
        if raw == PROPERTIES_NONE:
            persistent = False
        else:
            try:
                persistent = _persistent(raw)
            except ValueError:
                return 0
        if body_size:
            end = header_end + 8 + body_size
            if end >= len(data):
                return 0
            header_octet, frame_type, body_channel, size = _end_and_frame_header.unpack_from(data, header_end)
            if (header_octet != FRAME_END or frame_type != FRAME_BODY or body_channel != channel or size != body_size
                    or size > max_payload or data[end] != FRAME_END):
                return 0
            body = data[header_end + 8:end]
            self._repeat = _RepeatedPublish(data[method_start:header_end + 8], body_size, channel, args, raw,
                                            persistent)
        else:
            end = header_end
            if end >= len(data) or data[end] != FRAME_END:
                return 0
            body = b""
        events.append(Publish(channel, *args, raw, body, persistent))
        return end + 1

    def _decode_method(self, channel: int, index: int, payload: bytes) -> object:
        cls = commands.INDEX_MAPPING.get(index)
        if cls is None:
            return UnknownMethod(channel, index >> 16, index & 0xFFFF)
        method = cls()
        try:
            method.unmarshal(payload[4:])
        except Exception as exc:  # pamqp raises struct/Value/Index/Unicode errors on hostile input
            raise self._fail(SYNTAX_ERROR, f"malformed {cls.name}: {exc}") from None
        return MethodFrame(channel, method)

    def _content_header(self, channel: int, payload: bytes, events: list[object]) -> None:
        pending = self._content.get(channel)
        if pending is None or pending.have_header:
            raise self._fail(UNEXPECTED_FRAME, f"content header on channel {channel} without basic.publish")
        if len(payload) < 14:
            raise self._fail(FRAME_ERROR, "content header frame too short")
        class_id, weight, body_size = _header_fields.unpack_from(payload)
        if class_id != _BASIC or weight != 0:
            raise self._fail(FRAME_ERROR, f"content header of class {class_id}, weight {weight}")
        raw = payload[12:]
        try:
            persistent = _persistent(raw)
        except ValueError as exc:
            raise self._fail(SYNTAX_ERROR, str(exc)) from None
        pending.have_header = True
        pending.body_size = body_size
        pending.properties = raw
        pending.persistent = persistent
        if body_size > self.max_body_size:
            pending.skip = True
            events.append(ContentTooLarge(channel, body_size))
            if body_size == 0:  # pragma: no cover - a limit is never negative
                del self._content[channel]
            return
        if body_size == 0:
            del self._content[channel]
            events.append(Publish(channel, pending.exchange, pending.routing_key, pending.mandatory,
                                  pending.immediate, raw, b"", persistent))


# -- encoding ------------------------------------------------------------------------------------


def encode_method(channel: int, method: Method) -> bytes:
    """One method frame (pamqp marshals the arguments; it validates names as it goes)."""
    return pamqp_frame.marshal(method, channel)


def _short_str_bytes(value: str) -> bytes:
    encoded = value.encode("utf-8")
    if len(encoded) > 255:
        raise ValueError(f"short string of {len(encoded)} bytes (255 at most)")
    return bytes((len(encoded),)) + encoded


def short_str_fits(value: str) -> bool:
    return len(value) <= 63 or len(value.encode("utf-8")) <= 255


def encode_content(channel: int, properties: bytes, body: bytes, frame_max: int) -> list[bytes]:
    """The content header frame and the body frames, each at most `frame_max` bytes."""
    header_payload = _header_fields.pack(_BASIC, 0, len(body)) + properties
    parts = [_frame_header.pack(FRAME_HEADER, channel, len(header_payload)), header_payload, b"\xce"]
    chunk = frame_max - FRAME_OVERHEAD
    if len(body) <= chunk:
        if body:
            parts += (_frame_header.pack(FRAME_BODY, channel, len(body)), body, b"\xce")
        return parts
    view = memoryview(body)
    for start in range(0, len(body), chunk):
        piece = view[start:start + chunk]
        parts += (_frame_header.pack(FRAME_BODY, channel, len(piece)), piece.tobytes(), b"\xce")
    return parts


def encode_method_with_content(channel: int, method: Method, properties: bytes, body: bytes,
                               frame_max: int) -> bytes:
    """basic.get-ok / basic.return (rare): pamqp for the method, then the content."""
    return b"".join([pamqp_frame.marshal(method, channel), *encode_content(channel, properties, body, frame_max)])


def deliver_prefix(consumer_tag: str) -> bytes:
    """The fixed start of every basic.deliver for one consumer (class, method, tag)."""
    return b"\x00\x3c\x00\x3c" + _short_str_bytes(consumer_tag)


def exchange_and_key(exchange: str, routing_key: str) -> bytes:
    """The exchange and routing-key short strings of a deliver/return (cacheable per message)."""
    return _short_str_bytes(exchange) + _short_str_bytes(routing_key)


def encode_deliver(channel: int, prefix: bytes, delivery_tag: int, redelivered: bool, exchange_key: bytes,
                   properties: bytes, body: bytes, frame_max: int) -> bytes:
    """basic.deliver and its content, by hand (the delivery hot path)."""
    size = len(body)
    if size and size <= frame_max - FRAME_OVERHEAD:
        # One body frame (nearly every message): each frame's end octet shares a pack with the next header.
        return b"".join((
            _frame_header.pack(FRAME_METHOD, channel, len(prefix) + 9 + len(exchange_key)),
            prefix,
            _deliver_fixed.pack(delivery_tag, redelivered),
            exchange_key,
            _end_and_content_header.pack(FRAME_END, FRAME_HEADER, channel, 12 + len(properties), _BASIC, 0, size),
            properties,
            _end_and_frame_header.pack(FRAME_END, FRAME_BODY, channel, size),
            body,
            b"\xce",
        ))
    method_size = len(prefix) + 9 + len(exchange_key)
    parts = [
        _frame_header.pack(FRAME_METHOD, channel, method_size),
        prefix,
        _deliver_fixed.pack(delivery_tag, redelivered),
        exchange_key,
        b"\xce",
    ]
    header_payload_size = 12 + len(properties)
    size = len(body)
    if size <= frame_max - FRAME_OVERHEAD:
        parts += (
            _frame_header.pack(FRAME_HEADER, channel, header_payload_size),
            _header_fields.pack(_BASIC, 0, size),
            properties,
            b"\xce",
        )
        if size:
            parts += (_frame_header.pack(FRAME_BODY, channel, size), body, b"\xce")
        return b"".join(parts)
    parts += encode_content(channel, properties, body, frame_max)
    return b"".join(parts)


def encode_get_ok(channel: int, delivery_tag: int, redelivered: bool, exchange_key: bytes, message_count: int,
                  properties: bytes, body: bytes, frame_max: int) -> bytes:
    """basic.get-ok and its content (the exchange and key come pre-encoded with the message)."""
    payload = b"".join([_get_ok_fixed.pack(_GET_OK_ID, delivery_tag, redelivered), exchange_key,
                        _method_index.pack(message_count)])
    return b"".join([_frame_header.pack(FRAME_METHOD, channel, len(payload)), payload, b"\xce",
                     *encode_content(channel, properties, body, frame_max)])


def encode_return(channel: int, reply_code: int, text: str, exchange_key: bytes, properties: bytes, body: bytes,
                  frame_max: int) -> bytes:
    """basic.return and its content (mandatory and unroutable)."""
    payload = b"".join([_method_index.pack(_RETURN_ID), _u16.pack(reply_code), _short_str_bytes(text), exchange_key])
    return b"".join([_frame_header.pack(FRAME_METHOD, channel, len(payload)), payload, b"\xce",
                     *encode_content(channel, properties, body, frame_max)])


def encode_basic_ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """basic.ack from the server (publisher confirms)."""
    return _frame_header.pack(FRAME_METHOD, channel, 13) + _ack_payload.pack(_ACK_ID, delivery_tag, multiple) + b"\xce"


def method_ids(method: Any) -> tuple[int, int]:
    """(class id, method id) of a pamqp method, for Close frames."""
    index = method.index
    return index >> 16, index & 0xFFFF
