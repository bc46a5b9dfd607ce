"""Sans-IO server side of the AMQP 1.0 SASL layer (AMQP 1.0 part 5.3): bytes in, bytes out.

Mechanisms: PLAIN, ANONYMOUS (when auth is off) and EXTERNAL (RFC 4422
appendix A: the credential is the TLS client certificate; the caller offers
it only when there is a verified one, and compares the `authzid` the client
sent, if any, with that certificate's identity).

Proton's server cannot check a PLAIN password from Python (LIBRARIES.md), so
the gateway speaks the SASL layer itself and hands the AMQP layer that follows
to proton. The exchange, as the server sees it:

    client: AMQP 3.1.0.0                  server: AMQP 3.1.0.0, sasl-mechanisms
    client: sasl-init (PLAIN \\0user\\0pw)  -> `SaslInit` event; the caller decides
                                          server: sasl-outcome (`succeed` / `fail`)
    client: AMQP 0.1.0.0, open, ...       -> `remainder`: the AMQP layer's bytes

Everything a peer can get wrong raises `SaslError`, whose `reply` holds the
bytes to send before closing (our protocol header when the peer's header was
wrong, a sasl-outcome `auth` for an unusable sasl-init). Nothing else is ever
raised for any input.

Only the few AMQP types a sasl-init uses are decoded; any other value is
skipped by its encoding category (part 1.2), so an unexpected extra field
costs nothing and never reaches a decoder of ours that could misread it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from gateway.errors import ProtocolError
from gateway.events import NO_SECRET, Secret

SASL_HEADER = b"AMQP\x03\x01\x00\x00"
AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
_PROTOCOL_PREFIX = b"AMQP"
_HEADER_SIZE = 8

#: SASL frames are small (credentials); 512 is the least a peer must accept and a
#: bearer token of a few kilobytes fits many times over.
MAX_SASL_FRAME = 65536
#: Bytes a client may pipeline behind its sasl-init while the decision is pending.
MAX_PENDING = 1 << 20

#: The mechanism whose credential is the verified TLS client certificate (RFC 4422 appendix A).
EXTERNAL = "EXTERNAL"

_FRAME_TYPE_SASL = 0x01
_DESCRIPTOR_MECHANISMS = 0x40
_DESCRIPTOR_INIT = 0x41
_DESCRIPTOR_OUTCOME = 0x44
_SYMBOLIC_DESCRIPTORS = {
    b"amqp:sasl-mechanisms:list": 0x40,
    b"amqp:sasl-init:list": 0x41,
    b"amqp:sasl-challenge:list": 0x42,
    b"amqp:sasl-response:list": 0x43,
    b"amqp:sasl-outcome:list": 0x44,
}


class SaslCode(enum.IntEnum):
    """sasl-code (part 5.3.3.6)."""

    OK = 0
    #: Authentication failed: bad credentials.
    AUTH = 1
    SYS = 2
    SYS_PERM = 3
    #: A transient system error: the auth service is unavailable, try again later.
    SYS_TEMP = 4


class SaslError(ProtocolError):
    """The peer broke the SASL layer. Send `reply`, then close the connection."""

    def __init__(self, message: str, *, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslInit:
    """The client's chosen mechanism and credentials (PLAIN), decoded from its sasl-init."""

    mechanism: str
    #: PLAIN's authcid; "" for ANONYMOUS and EXTERNAL.
    username: str = ""
    secret: Secret = NO_SECRET
    #: EXTERNAL's initial response: the identity the client asks to act as ("" = the certificate's).
    authzid: str = ""
    #: The hostname field, for logs ("" when absent).
    hostname: str = ""

    def __post_init__(self) -> None:
        if not self.mechanism:
            raise ValueError("a sasl-init names a mechanism")


@dataclass(frozen=True, slots=True, kw_only=True)
class SaslSkipped:
    """The client sent the plain AMQP header and the server allows connections without SASL.

    Every byte received so far, the header included, is in `SaslServer.remainder`.
    """


SaslEvent = SaslInit | SaslSkipped


class _State(enum.Enum):
    HEADER = "waiting for the protocol header"
    INIT = "waiting for sasl-init"
    DECIDING = "waiting for the caller's decision"
    DONE = "succeeded"
    FAILED = "failed"


# -- encoding --------------------------------------------------------------------------------


def _sasl_frame(body: bytes) -> bytes:
    # size, doff (4-byte words of header), type, channel (ignored by SASL).
    return struct.pack(">IBBH", 8 + len(body), 2, _FRAME_TYPE_SASL, 0) + body


def _symbol_array(values: Sequence[bytes]) -> bytes:
    elements = b"".join(bytes((len(v),)) + v for v in values)
    # array8 counts the element constructor and elements in its size, after the size byte.
    payload = bytes((len(values), 0xA3)) + elements
    if len(payload) < 256:
        return bytes((0xE0, len(payload))) + payload
    payload = struct.pack(">I", len(values)) + b"\xa3" + elements
    return b"\xf0" + struct.pack(">I", len(payload)) + payload


def encode_mechanisms(mechanisms: Sequence[str]) -> bytes:
    """A sasl-mechanisms frame offering `mechanisms` (an array of symbols, as peers expect)."""
    if not mechanisms:
        raise ValueError("offer at least one mechanism")
    names = [m.encode("ascii") for m in mechanisms]
    if any(not name or len(name) > 255 for name in names):
        raise ValueError("a mechanism name is 1 to 255 ASCII characters")
    field = _symbol_array(names)
    listed = bytes((1,)) + field
    if len(listed) < 256:
        body = bytes((0x00, 0x53, _DESCRIPTOR_MECHANISMS, 0xC0, len(listed))) + listed
    else:
        listed = struct.pack(">I", 1) + field
        body = bytes((0x00, 0x53, _DESCRIPTOR_MECHANISMS, 0xD0)) + struct.pack(">I", len(listed)) + listed
    return _sasl_frame(body)


def encode_outcome(code: SaslCode) -> bytes:
    """A sasl-outcome frame. The code is a ubyte (0x50): a peer reads any other type as ok."""
    return _sasl_frame(bytes((0x00, 0x53, _DESCRIPTOR_OUTCOME, 0xC0, 0x03, 0x01, 0x50, int(code))))


# -- decoding ---------------------------------------------------------------------------------


class _Truncated(Exception):
    """A value runs past the end of its frame."""


class _Skipped:
    """A value of a type a sasl-init field never has."""


_SKIPPED = _Skipped()


class _Symbol(bytes):
    """An AMQP symbol (ASCII), kept apart from binary so a field's type can be checked."""


def _take(body: bytes, pos: int, size: int) -> int:
    end = pos + size
    if size < 0 or end > len(body):
        raise _Truncated
    return end


#: Described values nest; a sasl-init has no reason to nest them deeper than this.
_MAX_DEPTH = 8


def _decode_value(body: bytes, pos: int, depth: int = 0) -> tuple[object, int]:
    """One AMQP value at `pos`: (None | bool | int | bytes | str | _SKIPPED, next position)."""
    end = _take(body, pos, 1)
    code = body[pos]
    pos = end
    if code == 0x00:
        # A described value: skip the descriptor, keep nothing of the value.
        if depth >= _MAX_DEPTH:
            raise _Truncated
        _, pos = _decode_value(body, pos, depth + 1)
        _, pos = _decode_value(body, pos, depth + 1)
        return _SKIPPED, pos
    if code == 0x40:
        return None, pos
    if code in (0x41, 0x42):
        return code == 0x41, pos
    if code in (0x43, 0x44):
        return 0, pos
    if code in (0x50, 0x52, 0x53):
        end = _take(body, pos, 1)
        return body[pos], end
    if code == 0x70 or code == 0x80:
        width = 4 if code == 0x70 else 8
        end = _take(body, pos, width)
        return int.from_bytes(body[pos:end], "big"), end
    if code in (0xA0, 0xA1, 0xA3, 0xB0, 0xB1, 0xB3):
        width = 1 if code < 0xB0 else 4
        end = _take(body, pos, width)
        size = int.from_bytes(body[pos:end], "big")
        pos = end
        end = _take(body, pos, size)
        raw = body[pos:end]
        if code in (0xA1, 0xB1):
            try:
                return raw.decode("utf-8"), end
            except UnicodeDecodeError:
                return _SKIPPED, end
        if code in (0xA3, 0xB3):
            return _Symbol(raw), end
        return raw, end
    return _SKIPPED, _skip(body, pos, code)


def _skip(body: bytes, pos: int, code: int) -> int:
    """Skip a value of any other type by its constructor's width category (part 1.2)."""
    category = code >> 4
    fixed = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}
    if category in fixed:
        return _take(body, pos, fixed[category])
    if category in (0xA, 0xC, 0xE):
        end = _take(body, pos, 1)
        return _take(body, end, body[pos])
    if category in (0xB, 0xD, 0xF):
        end = _take(body, pos, 4)
        return _take(body, end, int.from_bytes(body[pos:end], "big"))
    raise _Truncated  # 0x0-0x3 and 0x1_-0x3_ constructors do not exist


def _decode_performative(body: bytes) -> tuple[int, list[object]]:
    """(descriptor code, fields) of a SASL frame body; raises _Truncated on bad encoding."""
    if len(body) < 2 or body[0] != 0x00:
        raise _Truncated
    descriptor, pos = _decode_value(body, 1)
    if isinstance(descriptor, _Symbol):
        code = _SYMBOLIC_DESCRIPTORS.get(bytes(descriptor), -1)
    elif isinstance(descriptor, int) and not isinstance(descriptor, bool):
        code = descriptor
    else:
        raise _Truncated
    end = _take(body, pos, 1)
    kind = body[pos]
    pos = end
    if kind == 0x45:
        count, list_end = 0, pos
    elif kind in (0xC0, 0xD0):
        width = 1 if kind == 0xC0 else 4
        end = _take(body, pos, width)
        size = int.from_bytes(body[pos:end], "big")
        list_end = _take(body, end, size)
        if size < width:
            raise _Truncated
        count_end = end + width
        count = int.from_bytes(body[end:count_end], "big")
        pos = count_end
    else:
        raise _Truncated
    fields: list[object] = []
    inner = body[:list_end]
    for _ in range(count):
        if pos >= list_end:
            raise _Truncated
        value, pos = _decode_value(inner, pos)
        fields.append(value)
    if pos != list_end:
        raise _Truncated
    return code, fields


def _parse_plain(response: bytes) -> tuple[str, Secret] | None:
    """PLAIN (RFC 4616): authzid NUL authcid NUL passwd. None when unusable."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        return None
    authzid, authcid, password = parts
    try:
        username = authcid.decode("utf-8")
        identity = authzid.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # Acting as another user is not offered: an authzid must name the same user.
    if not username or (identity and identity != username):
        return None
    return username, Secret(password)


# -- the state machine ------------------------------------------------------------------------


class SaslServer:
    """One connection's SASL layer, server side.

    Feed bytes with `receive_data` until it returns an event; send
    `data_to_send()` after every call. On a `SaslInit`, call `succeed()` or
    `fail(code)`; after `succeed()`, `remainder` holds the bytes the client
    sent after its sasl-init (the AMQP layer's, usually its AMQP header).
    """

    __slots__ = ("mechanisms", "allow_skip", "max_frame_size", "_state", "_buffer", "_out", "remainder")

    def __init__(
        self,
        *,
        mechanisms: Sequence[str] = ("PLAIN",),
        allow_skip: bool = False,
        max_frame_size: int = MAX_SASL_FRAME,
    ) -> None:
        if not mechanisms:
            raise ValueError("offer at least one mechanism")
        self.mechanisms = tuple(mechanisms)
        #: Accept a client that sends the AMQP header straight away (auth is off).
        self.allow_skip = allow_skip
        self.max_frame_size = max(512, max_frame_size)
        self._state = _State.HEADER
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.remainder = b""

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> SaslEvent | None:
        """Consume bytes; return the event they complete, or None when more are needed."""
        state = self._state
        if state is _State.FAILED:
            raise SaslError("the SASL exchange already failed")
        if state is _State.DONE:
            raise SaslError("the SASL exchange is over: the AMQP layer owns the bytes")
        self._buffer += data
        if state is _State.DECIDING:
            if len(self._buffer) > MAX_PENDING:
                self._fail_with("too many bytes sent before the sasl-outcome", self._outcome_reply())
            return None
        if state is _State.HEADER:
            event = self._read_header()
            if event is not None or self._state is _State.HEADER:
                return event
        return self._read_init()

    def succeed(self) -> None:
        """The credentials were accepted: send outcome ok and hand over the remaining bytes."""
        self._require(_State.DECIDING)
        self._out.append(encode_outcome(SaslCode.OK))
        self._state = _State.DONE
        self.remainder = bytes(self._buffer)
        self._buffer.clear()

    def fail(self, code: SaslCode) -> None:
        """Refuse: send the outcome; the caller closes the connection after sending it."""
        self._require(_State.DECIDING)
        if code is SaslCode.OK:
            raise ValueError("fail() needs a failure code")
        self._out.append(encode_outcome(code))
        self._state = _State.FAILED
        self._buffer.clear()

    def _require(self, state: _State) -> None:
        if self._state is not state:
            raise RuntimeError(f"the SASL exchange is {self._state.value}, not {state.value}")

    def _fail_with(self, message: str, reply: bytes) -> NoReturn:
        self._state = _State.FAILED
        self._buffer.clear()
        raise SaslError(message, reply=reply)

    def _outcome_reply(self) -> bytes:
        return encode_outcome(SaslCode.AUTH)

    def _read_header(self) -> SaslEvent | None:
        buffer = self._buffer
        seen = bytes(buffer[:_HEADER_SIZE])
        # Garbage is refused at its first byte, not after eight.
        if not _PROTOCOL_PREFIX.startswith(seen[:4]):
            self._fail_with(f"not an AMQP protocol header: {seen!r}", SASL_HEADER)
        if len(seen) < _HEADER_SIZE:
            return None
        if seen == SASL_HEADER:
            del buffer[:_HEADER_SIZE]
            self._out.append(SASL_HEADER + encode_mechanisms(self.mechanisms))
            self._state = _State.INIT
            return None
        if seen == AMQP_HEADER and self.allow_skip:
            self._state = _State.DONE
            self.remainder = bytes(buffer)
            buffer.clear()
            return SaslSkipped()
        if seen == AMQP_HEADER:
            self._fail_with("the client skipped SASL, which this listener requires", SASL_HEADER)
        self._fail_with(f"unsupported protocol header {seen!r} (this port speaks AMQP 1.0)", SASL_HEADER)

    def _read_init(self) -> SaslEvent | None:
        buffer = self._buffer
        while len(buffer) >= 8:
            size, doff, frame_type = struct.unpack_from(">IBB", buffer)
            if frame_type != _FRAME_TYPE_SASL:
                self._fail_with(f"frame type {frame_type} during SASL", self._outcome_reply())
            if doff < 2 or size < doff * 4:
                self._fail_with(f"malformed SASL frame header (size {size}, doff {doff})", self._outcome_reply())
            if size > self.max_frame_size:
                self._fail_with(f"SASL frame of {size} bytes exceeds {self.max_frame_size}", self._outcome_reply())
            if len(buffer) < size:
                return None
            body = bytes(buffer[doff * 4:size])
            del buffer[:size]
            if not body:
                continue  # an empty frame is a heartbeat
            return self._on_frame(body)
        return None

    def _on_frame(self, body: bytes) -> SaslInit:
        reply = self._outcome_reply()
        try:
            code, fields = _decode_performative(body)
        except _Truncated:
            self._fail_with("undecodable SASL frame", reply)
        if code != _DESCRIPTOR_INIT:
            self._fail_with(f"expected sasl-init, got SASL performative 0x{code:02x}", reply)
        fields += [None] * (3 - len(fields))
        mechanism, response, hostname = fields[:3]
        if not isinstance(mechanism, _Symbol) or not mechanism:
            self._fail_with("sasl-init without a mechanism", reply)
        if response is not None and (not isinstance(response, bytes) or isinstance(response, _Symbol)):
            self._fail_with("sasl-init initial-response is not binary", reply)
        name = mechanism.decode("ascii", "replace")
        if name not in self.mechanisms:
            self._fail_with(f"mechanism {name!r} was not offered", reply)
        host = hostname if isinstance(hostname, str) else ""
        self._state = _State.DECIDING
        if name == "ANONYMOUS":
            return SaslInit(mechanism=name, hostname=host)
        if name == EXTERNAL:
            try:
                authzid = (response or b"").decode("utf-8")
            except UnicodeDecodeError:
                self._fail_with("EXTERNAL authorization identity is not UTF-8", reply)
            return SaslInit(mechanism=name, authzid=authzid, hostname=host)
        credentials = _parse_plain(response or b"")
        if credentials is None:
            self._fail_with("malformed PLAIN response (expected authzid NUL user NUL password)", reply)
        username, secret = credentials
        return SaslInit(mechanism=name, username=username, secret=secret, hostname=host)
