"""The server side of one MQTT connection (3.1.1 or 5), without I/O: h11's shape.

    conn = ServerConnection(max_packet_size=...)
    conn.receive_data(data)             # bytes from the transport
    while (event := conn.next_event()) is not NEED_DATA:
        ...                             # a packet value (gateway.mqtt.packets)
    transport.write(conn.send(Connack(...)))

(`conn.events(data)` does both for one read, as the broker's hot path does.)

The connection knows no socket, no clock, no auth and no router. It knows
the protocol: which packets a client may send in which state (`RECEIVE`),
which the server may send (`SEND`), the version the CONNECT chose, the limits
each side announced in CONNECT and CONNACK, and how a packet is written for
that version. The broker above speaks MQTT 5 reason codes only; on a 3.1.1
connection `send` says what 3.1.1 can say (CONNACK return codes, SUBACK
0x80, an acknowledgement without its reason, nothing at all for a
DISCONNECT). A peer's protocol error is an `MQTTProtocolError` carrying the
v5 reason code; `reject(error)` gives the bytes to send before closing
(a CONNACK or DISCONNECT with that code on v5, the 3.1.1 CONNACK where 3.1.1
has one, else nothing).

Hot path: PUBLISH heads (`publish_head`, `packet_id_bytes`) and successful
acknowledgements (`gateway.mqtt.codec.encode_puback` and friends, the same
bytes in both versions) are written without `send` and its checks, by a
broker that has seen the CONNACK go out.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from gateway.mqtt import reasons
from gateway.mqtt.codec import (
    VALID_FIRST_BYTES,
    MQTTDecoder,
    encode,
    encode_packet_id,
    encode_packet_id5,
    encode_publish_head,
)
from gateway.mqtt.kinds import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MQTT_5,
    MQTT_311,
    NAMES,
    PINGREQ,
    PINGRESP,
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
from gateway.mqtt.packets import (
    KIND_OF,
    MAX_REMAINING_LENGTH,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Packet,
    Puback,
    Pubcomp,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
)
from gateway.mqtt.properties import EMPTY, Properties, PropertyId, encode_varint


class State(enum.Enum):
    #: Nothing received yet: only a CONNECT may come.
    AWAIT_CONNECT = "await_connect"
    #: CONNECT received, CONNACK not sent. The client may already send more (MQTT-3.1.4: it need not wait).
    CONNECTING = "connecting"
    #: MQTT 5 CONNECT with an authentication method: AUTH packets until the server's CONNACK.
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"
    #: DISCONNECT either way, a refused CONNACK, or a protocol error: nothing more is read or sent.
    CLOSED = "closed"


class _NeedData:
    """`next_event()`'s answer when the bytes received so far hold no whole packet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

_S = State
_OPERATIONS = (PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE, PINGREQ)

#: What a client may send in each state, and the state that follows. Two rules
#: are not in the table: a v5 CONNECT with an authentication method leads to
#: AUTHENTICATING, and an AUTH after CONNACK needs that method in the CONNECT.
RECEIVE: dict[State, dict[int, State]] = {
    _S.AWAIT_CONNECT: {CONNECT: _S.CONNECTING},
    _S.CONNECTING: {**{kind: _S.CONNECTING for kind in _OPERATIONS}, DISCONNECT: _S.CLOSED},
    # MQTT-3.1.2-30: with an authentication method, only AUTH or DISCONNECT before CONNACK.
    _S.AUTHENTICATING: {AUTH: _S.AUTHENTICATING, DISCONNECT: _S.CLOSED},
    _S.CONNECTED: {**{kind: _S.CONNECTED for kind in _OPERATIONS}, AUTH: _S.CONNECTED, DISCONNECT: _S.CLOSED},
    _S.CLOSED: {},
}

#: What the server may send in each state, and the state that follows. Not in
#: the table: a CONNACK with a refusal (a reason code of 0x80 or more) closes.
SEND: dict[State, dict[int, State]] = {
    _S.AWAIT_CONNECT: {},
    # MQTT-3.14.0-1: no DISCONNECT before a successful CONNACK; a refusal is a CONNACK.
    _S.CONNECTING: {CONNACK: _S.CONNECTED},
    _S.AUTHENTICATING: {AUTH: _S.AUTHENTICATING, CONNACK: _S.CONNECTED},
    _S.CONNECTED: {
        **{kind: _S.CONNECTED for kind in (PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK, PINGRESP)},
        AUTH: _S.CONNECTED,
        DISCONNECT: _S.CLOSED,
    },
    _S.CLOSED: {},
}

#: Packets that tell the peer about a refusal or a problem; reason strings and user
#: properties go in these even when the client asked for no problem information (3.1.2.11.7).
_ALWAYS_INFORMED = frozenset((CONNACK, PUBLISH, DISCONNECT))
#: A reason string cut to this many characters: enough to say what went wrong.
_REASON_STRING_CHARS = 200


def _accept_table(version: int, state: State, auth_method: bool) -> bytes:
    """The first bytes the decoder takes in `state`: well formed for the version, and allowed now."""
    allowed = set(RECEIVE[state])
    if state is _S.CONNECTED and not auth_method:
        allowed.discard(AUTH)
    valid = VALID_FIRST_BYTES[version]
    return bytes(valid[first] and (first >> 4) in allowed for first in range(256))


_TABLES: dict[tuple[int, State, bool], bytes] = {
    (version, state, method): _accept_table(version, state, method)
    for version in (MQTT_311, MQTT_5)
    for state in State
    for method in (False, True)
}


def _v4_packet(packet: Packet) -> Packet | None:
    """What 3.1.1 can say of a packet the broker wrote with MQTT 5 codes (None: nothing)."""
    kind = type(packet)
    if kind is Connack:
        assert isinstance(packet, Connack)
        return Connack(
            session_present=packet.session_present, reason_code=reasons.connack_code_v4(packet.reason_code)
        )
    if kind is Suback:
        assert isinstance(packet, Suback)
        return Suback(packet_id=packet.packet_id, reason_codes=tuple(map(reasons.suback_code_v4, packet.reason_codes)))
    if isinstance(packet, (Puback, Pubrec, Pubrel, Pubcomp)):
        # 3.1.1 acknowledges a refused message like an accepted one (its only answer).
        if packet.reason_code or packet.properties is not EMPTY:
            return type(packet)(packet.packet_id)
        return packet
    if isinstance(packet, Unsuback):
        return Unsuback(packet.packet_id)
    if kind is Disconnect:
        return None  # a 3.1.1 server closes without a word
    if getattr(packet, "properties", EMPTY):
        raise ValueError(f"MQTT 3.1.1 {NAMES[KIND_OF[kind]]} cannot carry properties")
    return packet


class ServerConnection:
    """One client's connection as the server sees it; see the module docstring."""

    __slots__ = (
        "state",
        "connect",
        "max_packet_size",
        "topic_alias_maximum",
        "subscription_identifiers_available",
        "shared_subscriptions_available",
        "receive_maximum",
        "client_receive_maximum",
        "client_maximum_packet_size",
        "client_topic_alias_maximum",
        "problem_information",
        "keepalive",
        "packet_id_bytes",
        "_decoder",
        "_auth_method",
    )

    def __init__(self, *, max_packet_size: int = MAX_REMAINING_LENGTH) -> None:
        self.state = State.AWAIT_CONNECT
        #: The client's CONNECT once received.
        self.connect: Connect | None = None
        #: The largest remaining length accepted from the client; announced to a v5 client in CONNACK.
        self.max_packet_size = max_packet_size
        # What this server announced in its CONNACK (MQTT 5 defaults until then), enforced on input.
        self.topic_alias_maximum = 0
        self.subscription_identifiers_available = True
        self.shared_subscriptions_available = True
        self.receive_maximum = 65_535
        # What the client announced in its CONNECT (MQTT 5; 3.1.1 clients announce nothing).
        self.client_receive_maximum = 65_535
        #: Largest whole packet the client takes; None: no limit but the protocol's.
        self.client_maximum_packet_size: int | None = None
        self.client_topic_alias_maximum = 0
        #: MQTT 5 request problem information: reason strings and user properties only where it allows.
        self.problem_information = True
        #: Seconds of silence the server allows (CONNECT's keep alive, or the server keep alive it sent).
        self.keepalive = 0
        #: The packet id as written after a PUBLISH head (MQTT 5 adds the empty property length).
        self.packet_id_bytes: Callable[[int], bytes] = encode_packet_id
        self._auth_method = False
        decoder = self._decoder = MQTTDecoder(max_packet_size=max_packet_size)
        decoder.accept = _TABLES[MQTT_311, State.AWAIT_CONNECT, False]
        decoder.on_control = self._received_control
        decoder.refuse = self._refuse
        decoder.check_publish = self._check_publish

    # -- what is known -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """4 for 3.1.1 (and 3.1), 5 for MQTT 5; 4 until a CONNECT says otherwise."""
        return self._decoder.version

    @property
    def v5(self) -> bool:
        return self._decoder.version == MQTT_5

    @property
    def announced_packet_size(self) -> int | None:
        """The Maximum Packet Size (whole packet) that matches `max_packet_size` (a remaining length), if below the protocol's."""
        total = self.max_packet_size + 1 + len(encode_varint(self.max_packet_size))
        return total if self.max_packet_size < MAX_REMAINING_LENGTH else None

    # -- receiving -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; the packets they complete come out of `next_event()`."""
        self._decoder.feed(data)

    def next_event(self) -> Packet | _NeedData:
        """The next packet from the client, or NEED_DATA. Raises MQTTProtocolError (again on every later call)."""
        packet = self._decoder.next_packet()
        return NEED_DATA if packet is None else packet

    def events(self, data: bytes) -> list[Packet]:
        """`receive_data(data)` and every packet it completes, in one call (the hot path).

        On a protocol error the packets before it are in the error's `decoded`.
        """
        return self._decoder.packets(data)

    def _received_control(self, packet: Packet) -> bool:
        """The decoder's hook after a CONNECT, DISCONNECT, AUTH or SUBSCRIBE: state changes and rules. True: stop reading."""
        kind = KIND_OF[type(packet)]
        state = self.state
        next_state = RECEIVE[state][kind]  # the accept table let only allowed kinds through
        if kind == CONNECT:
            assert isinstance(packet, Connect)
            self.connect = packet
            self.keepalive = packet.keepalive
            if packet.protocol_level == MQTT_5:
                self.packet_id_bytes = encode_packet_id5
                self._client_limits(packet.properties)
                if packet.properties.authentication_method is not None:
                    self._auth_method = True
                    next_state = State.AUTHENTICATING
        elif kind == SUBSCRIBE:
            assert isinstance(packet, Subscribe)
            if packet.properties.subscription_identifiers and not self.subscription_identifiers_available:
                raise MQTTProtocolError(
                    "SUBSCRIBE carries a subscription identifier; this server announced none are available",
                    reason_code=reasons.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                )
        self._enter(next_state)
        return next_state is State.CLOSED

    def _client_limits(self, properties: Properties) -> None:
        receive_maximum = properties.receive_maximum
        if receive_maximum is not None:
            self.client_receive_maximum = receive_maximum
        self.client_maximum_packet_size = properties.maximum_packet_size
        self.client_topic_alias_maximum = properties.topic_alias_maximum or 0
        self.problem_information = properties.request_problem_information != 0

    def _refuse(self, kind: int) -> MQTTProtocolError:
        name = NAMES[kind]
        state = self.state
        if state is State.AWAIT_CONNECT:
            message = f"expected CONNECT, got {name} (MQTT-3.1.0-1)"
        elif kind == CONNECT:
            message = "second CONNECT on one connection (MQTT-3.1.0-2)"
        elif kind == AUTH:
            message = "AUTH from a client that gave no authentication method in its CONNECT (MQTT-4.12.0-1)"
        elif state is State.AUTHENTICATING:
            message = f"{name} before the authentication exchange ended (MQTT-3.1.2-30)"
        elif kind in (CONNACK, SUBACK, UNSUBACK, PINGRESP):
            message = f"{name} is a server's packet; a client must not send it"
        else:
            message = f"unexpected {name} in state {state.value}"
        return MQTTProtocolError(message, reason_code=reasons.PROTOCOL_ERROR)

    def _check_publish(self, properties: Properties) -> None:
        """Rules on a v5 PUBLISH's properties that depend on the server's side."""
        if PropertyId.SUBSCRIPTION_IDENTIFIER in properties:
            raise MQTTProtocolError(
                "a client's PUBLISH must not carry a subscription identifier (MQTT-3.3.4-6)",
                reason_code=reasons.PROTOCOL_ERROR,
            )
        alias = properties.topic_alias
        if alias is not None and alias > self.topic_alias_maximum:
            raise MQTTProtocolError(
                f"topic alias {alias} exceeds the topic alias maximum of {self.topic_alias_maximum} this server "
                "announced (MQTT-3.3.2-9)",
                reason_code=reasons.TOPIC_ALIAS_INVALID,
            )

    def _enter(self, state: State) -> None:
        self.state = state
        self._decoder.accept = _TABLES[self._decoder.version, state, self._auth_method]

    # -- sending -------------------------------------------------------------------------------------

    def send(self, packet: Packet) -> bytes:
        """The bytes of `packet` for this connection's version; the state moves on.

        The broker writes MQTT 5 reason codes; 3.1.1 gets its own (see the
        module docstring). ValueError when the server may not send that
        packet now: a bug of the broker, never the client's doing.
        """
        kind = KIND_OF[type(packet)]
        state = self.state
        next_state = SEND[state].get(kind)
        if next_state is None:
            raise ValueError(f"the server may not send {NAMES[kind]} in state {state.value}")
        if kind == CONNACK:
            assert isinstance(packet, Connack)
            if reasons.is_error(packet.reason_code):
                next_state = State.CLOSED
            elif self.v5:
                packet = self._announce(packet)
        if self.v5:
            if not self.problem_information and kind not in _ALWAYS_INFORMED:
                packet = _without_problem_information(packet)
            data = encode(packet, MQTT_5)
            limit = self.client_maximum_packet_size
            if limit is not None and len(data) > limit and kind != PUBLISH:
                # MQTT-3.1.2-25: what the client cannot take is not sent; the details go first.
                data = encode(_without_problem_information(packet), MQTT_5)
        else:
            v4 = _v4_packet(packet)
            data = b"" if v4 is None else encode(v4, MQTT_311)
        self._enter(next_state)
        return data

    def _announce(self, connack: Connack) -> Connack:
        """A successful v5 CONNACK: record what it announces, and announce the packet size limit."""
        props = connack.properties
        if props.maximum_packet_size is None and self.announced_packet_size is not None:
            props = props.replace(maximum_packet_size=self.announced_packet_size)
        self.topic_alias_maximum = props.topic_alias_maximum or 0
        self.subscription_identifiers_available = props.subscription_identifier_available != 0
        self.shared_subscriptions_available = props.shared_subscription_available != 0
        if props.receive_maximum is not None:
            self.receive_maximum = props.receive_maximum
        if props.server_keep_alive is not None:
            self.keepalive = props.server_keep_alive
        if props is not connack.properties:
            connack = Connack(session_present=connack.session_present, reason_code=connack.reason_code,
                              properties=props)
        return connack

    def publish_head(self, topic: str, payload_length: int, qos: int, retain: bool, dup: bool) -> bytes:
        """A PUBLISH without properties up to its packet id (QoS 1/2) or payload (QoS 0): see `packet_id_bytes`."""
        return encode_publish_head(topic, payload_length, qos, retain, dup, self._decoder.version)

    # -- ending ----------------------------------------------------------------------------------------

    def reject(self, error: MQTTProtocolError) -> bytes:
        """The bytes to send a client that broke the protocol, before closing; the state is CLOSED after."""
        state = self.state
        self._enter(State.CLOSED)
        if state is State.CLOSED:
            return b""
        if self.v5:
            reason_string = str(error)[:_REASON_STRING_CHARS]
            props = Properties(reason_string=reason_string) if reason_string else EMPTY
            code = error.reason_code
            if state is State.CONNECTED:
                if code not in reasons.DISCONNECT_CODES:
                    code = reasons.PROTOCOL_ERROR
                return encode(Disconnect(reason_code=code, properties=props), MQTT_5)
            if code not in reasons.CONNACK_CODES:
                code = reasons.PROTOCOL_ERROR
            return encode(Connack(reason_code=code, properties=props), MQTT_5)
        if state is not State.CONNECTED and error.connack_code is not None:
            return encode(Connack(reason_code=error.connack_code), MQTT_311)
        return b""

    def close(self, reason_code: int = reasons.NORMAL_DISCONNECTION, reason_string: str = "") -> bytes:
        """The server ends the connection: a v5 DISCONNECT when the client is connected, else nothing.

        Before CONNACK a refusal is a CONNACK (`send`); this says nothing then.
        """
        state = self.state
        if state is State.CLOSED:
            return b""
        if state is not State.CONNECTED or not self.v5:
            self._enter(State.CLOSED)
            return b""
        if reason_code not in reasons.DISCONNECT_CODES:
            reason_code = reasons.UNSPECIFIED_ERROR
        props = Properties(reason_string=reason_string[:_REASON_STRING_CHARS]) if reason_string else EMPTY
        return self.send(Disconnect(reason_code=reason_code, properties=props))


def _without_problem_information(packet: Packet) -> Packet:
    """The packet without its reason string and user properties (what a client may have declined)."""
    props: Properties = getattr(packet, "properties", EMPTY)
    stripped = props.without(PropertyId.REASON_STRING, PropertyId.USER_PROPERTY)
    if stripped is props:
        return packet
    if isinstance(packet, (Puback, Pubrec, Pubrel, Pubcomp)):
        return type(packet)(packet.packet_id, packet.reason_code, stripped)
    return dataclasses.replace(packet, properties=stripped)  # type: ignore[arg-type,type-var]
