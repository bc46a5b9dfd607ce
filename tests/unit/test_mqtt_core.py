"""The sans-IO MQTT server connection: states and transitions, versions, limits, errors and their answers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mqtt import (
    NEED_DATA,
    QOS_OPTIONS,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTProtocolError,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    ServerConnection,
    State,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    decode_packet,
    encode,
    encode_packet_id,
    encode_packet_id5,
    encode_publish_head,
)
from gateway.mqtt import reasons
from gateway.mqtt.connection import RECEIVE, SEND

CONNECT4 = encode(Connect(client_id="c4"))
CONNECT5 = encode(Connect(protocol_level=5, client_id="c5"))


def connected(version: int = 4, connack: Connack | None = None, **kwargs: int) -> ServerConnection:
    conn = ServerConnection(**kwargs)
    [connect] = conn.events(CONNECT5 if version == 5 else CONNECT4)
    assert isinstance(connect, Connect)
    conn.send(connack or Connack())
    assert conn.state is State.CONNECTED
    return conn


def error_of(conn: ServerConnection, data: bytes) -> MQTTProtocolError:
    with pytest.raises(MQTTProtocolError) as caught:
        conn.events(data)
    return caught.value


# -- the tables ----------------------------------------------------------------------------------------


def test_tables_cover_every_state_and_closed_is_final() -> None:
    assert set(RECEIVE) == set(SEND) == set(State)
    assert RECEIVE[State.CLOSED] == {} and SEND[State.CLOSED] == {}
    assert set(RECEIVE[State.AWAIT_CONNECT]) == {1}  # only CONNECT
    assert 1 not in RECEIVE[State.CONNECTED]  # no second CONNECT


# -- states -----------------------------------------------------------------------------------------------


def test_v4_connect_then_connack_then_traffic() -> None:
    conn = ServerConnection()
    assert conn.state is State.AWAIT_CONNECT
    conn.receive_data(CONNECT4[:5])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(CONNECT4[5:])
    event = conn.next_event()
    assert isinstance(event, Connect) and event.client_id == "c4"
    assert (conn.state, conn.version, conn.connect) == (State.CONNECTING, 4, event)
    assert conn.next_event() is NEED_DATA
    assert conn.send(Connack(session_present=True)) == b"\x20\x02\x01\x00"
    assert conn.state is State.CONNECTED
    assert conn.events(b"\xc0\x00" + encode(Puback(3))) == [Pingreq(), Puback(3)]
    assert conn.send(Pingresp()) == b"\xd0\x00"


def test_v5_connect_chooses_the_v5_wire_form() -> None:
    conn = ServerConnection()
    conn.events(CONNECT5)
    assert (conn.version, conn.v5, conn.packet_id_bytes) == (5, True, encode_packet_id5)
    assert decode_packet(conn.send(Connack()), 5) == Connack()
    assert conn.publish_head("t", 3, 1, False, False) == encode_publish_head("t", 3, 1, False, False, 5)
    assert connected(4).packet_id_bytes is encode_packet_id


def test_a_client_may_send_before_the_connack() -> None:
    conn = ServerConnection()
    publish = Publish("a", b"x", 1, False, False, 1)
    events = conn.events(CONNECT4 + encode(publish) + b"\xc0\x00")
    assert events[1:] == [publish, Pingreq()]
    assert conn.state is State.CONNECTING


@pytest.mark.parametrize("first", [encode(Publish("a", b"")), b"\xc0\x00", encode(Subscribe(packet_id=1, topics=(("a", QOS_OPTIONS[0]),)))])
def test_nothing_but_connect_first(first: bytes) -> None:
    conn = ServerConnection()
    error = error_of(conn, first)
    assert "expected CONNECT" in str(error) and error.reason_code == reasons.PROTOCOL_ERROR
    assert conn.reject(error) == b""  # 3.1.1 (no version known): closed without a word
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(("version", "answer"), [(4, b""), (5, None)])
def test_second_connect_is_a_protocol_error(version: int, answer: bytes | None) -> None:
    conn = connected(version)
    error = error_of(conn, CONNECT5 if version == 5 else CONNECT4)
    assert "second CONNECT" in str(error)
    data = conn.reject(error)
    if answer is not None:
        assert data == answer
    else:
        reply = decode_packet(data, 5)
        assert isinstance(reply, Disconnect) and reply.reason_code == reasons.PROTOCOL_ERROR
        assert "second CONNECT" in (reply.properties.reason_string or "")
    assert conn.state is State.CLOSED


def test_server_packets_from_a_client_are_refused() -> None:
    for packet in (Connack(), Suback(packet_id=1, reason_codes=(0,)), Pingresp(), Unsuback(1)):
        conn = connected(4)
        error = error_of(conn, encode(packet))
        assert "server's packet" in str(error)


def test_disconnect_closes_and_what_follows_is_ignored() -> None:
    conn = connected(4)
    assert conn.events(b"\xe0\x00" + b"garbage that would be an error") == [Disconnect()]
    assert conn.state is State.CLOSED
    assert conn.events(b"\xff\xff") == []
    with pytest.raises(ValueError, match="may not send"):
        conn.send(Puback(1))


def test_refusing_connack_closes() -> None:
    conn = ServerConnection()
    conn.events(CONNECT5)
    data = conn.send(Connack(reason_code=reasons.BAD_USER_NAME_OR_PASSWORD))
    assert decode_packet(data, 5) == Connack(reason_code=0x86)
    assert conn.state is State.CLOSED


def test_nothing_but_connack_before_connack() -> None:
    conn = ServerConnection()
    conn.events(CONNECT5)
    for packet in (Puback(1), Disconnect(), Suback(packet_id=1, reason_codes=(0,))):
        with pytest.raises(ValueError, match="connecting"):
            conn.send(packet)
    assert conn.close(reasons.SERVER_SHUTTING_DOWN) == b""  # before CONNACK a refusal is a CONNACK
    assert conn.state is State.CLOSED


# -- MQTT 5 enhanced authentication ----------------------------------------------------------------------


def test_authentication_method_leads_to_the_auth_exchange() -> None:
    conn = ServerConnection()
    method = Properties(authentication_method="SCRAM-SHA-256", authentication_data=b"client-first")
    conn.events(encode(Connect(protocol_level=5, client_id="a", properties=method)))
    assert conn.state is State.AUTHENTICATING
    # MQTT-3.1.2-30: only AUTH or DISCONNECT until the CONNACK.
    step = Auth(reason_code=reasons.CONTINUE_AUTHENTICATION, properties=method)
    assert decode_packet(conn.send(step), 5) == step
    assert conn.events(encode(step, 5)) == [step]
    conn.send(Connack())
    assert conn.state is State.CONNECTED
    assert conn.events(encode(Auth(reason_code=reasons.REAUTHENTICATE, properties=method), 5))[0].reason_code == 0x19  # type: ignore[union-attr]


def test_publish_during_the_auth_exchange_is_refused() -> None:
    conn = ServerConnection()
    conn.events(encode(Connect(protocol_level=5, client_id="a", properties=Properties(authentication_method="X"))))
    error = error_of(conn, encode(Publish("a", b""), 5))
    assert "authentication exchange" in str(error) and error.reason_code == reasons.PROTOCOL_ERROR
    # Before CONNACK, a v5 client is told in a CONNACK.
    assert decode_packet(conn.reject(error), 5).reason_code == reasons.PROTOCOL_ERROR  # type: ignore[union-attr]


def test_auth_without_a_method_is_refused() -> None:
    conn = connected(5)
    error = error_of(conn, encode(Auth(), 5))
    assert "no authentication method" in str(error)
    assert connected(4).state is State.CONNECTED
    assert "reserved" in str(error_of(connected(4), b"\xf0\x00"))  # no AUTH in 3.1.1 at all


# -- what 3.1.1 can say -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "v4_code"),
    [(0x86, 4), (0x87, 5), (0x88, 3), (0x89, 3), (0x84, 1), (0x85, 2), (0x8C, 4), (0x9F, 3), (0x8A, 5)],
)
def test_connack_reason_codes_become_3_1_1_return_codes(reason: int, v4_code: int) -> None:
    conn = ServerConnection()
    conn.events(CONNECT4)
    assert conn.send(Connack(reason_code=reason)) == bytes((0x20, 2, 0, v4_code))


def test_v4_gets_what_it_can_carry() -> None:
    conn = connected(4)
    assert conn.send(Suback(packet_id=1, reason_codes=(1, 0x87, 0x8F, 0x9E))) == b"\x90\x06\x00\x01\x01\x80\x80\x80"
    assert conn.send(Puback(5, reasons.NOT_AUTHORIZED, Properties(reason_string="no"))) == b"\x40\x02\x00\x05"
    assert conn.send(Pubrec(5, reasons.QUOTA_EXCEEDED)) == b"\x50\x02\x00\x05"
    assert conn.send(Pubcomp(5, reasons.PACKET_IDENTIFIER_NOT_FOUND)) == b"\x70\x02\x00\x05"
    assert conn.send(Unsuback(6, (0, 0x11))) == b"\xb0\x02\x00\x06"
    assert conn.close(reasons.SERVER_SHUTTING_DOWN, "bye") == b""  # a 3.1.1 server just closes
    assert conn.state is State.CLOSED


def test_v5_gets_reason_codes() -> None:
    conn = connected(5)
    assert conn.send(Puback(5, reasons.NOT_AUTHORIZED)) == b"\x40\x03\x00\x05\x87"
    assert conn.send(Puback(5)) == b"\x40\x02\x00\x05"
    assert conn.send(Suback(packet_id=1, reason_codes=(1, 0x87))) == b"\x90\x05\x00\x01\x00\x01\x87"
    bye = decode_packet(conn.close(reasons.SESSION_TAKEN_OVER, "taken over"), 5)
    assert bye == Disconnect(reason_code=0x8E, properties=Properties(reason_string="taken over"))
    assert conn.state is State.CLOSED


def test_no_problem_information_when_the_client_declined_it() -> None:
    conn = ServerConnection()
    conn.events(encode(Connect(protocol_level=5, client_id="q", properties=Properties(request_problem_information=0))))
    conn.send(Connack())
    why = Properties(reason_string="denied", user_property=("k", "v"))
    assert conn.send(Puback(1, reasons.NOT_AUTHORIZED, why)) == b"\x40\x03\x00\x01\x87"
    # CONNACK, PUBLISH and DISCONNECT may still say why (3.1.2.11.7).
    assert decode_packet(conn.close(reasons.NOT_AUTHORIZED, "rights ended"), 5).properties.reason_string == "rights ended"  # type: ignore[union-attr]


# -- limits both sides announced ---------------------------------------------------------------------


def test_client_limits_are_recorded() -> None:
    conn = ServerConnection()
    conn.events(encode(Connect(protocol_level=5, client_id="l", keepalive=30, properties=Properties(
        receive_maximum=7, maximum_packet_size=512, topic_alias_maximum=3))))
    assert (conn.client_receive_maximum, conn.client_maximum_packet_size, conn.client_topic_alias_maximum) == (7, 512, 3)
    conn.send(Connack(properties=Properties(server_keep_alive=10)))
    assert conn.keepalive == 10


def test_maximum_packet_size_is_announced_and_enforced() -> None:
    conn = ServerConnection(max_packet_size=1000)
    conn.events(CONNECT5)
    connack = decode_packet(conn.send(Connack()), 5)
    assert connack.properties.maximum_packet_size == 1003  # type: ignore[union-attr]
    # A whole packet of exactly the announced size is taken; one byte more is not.
    payload = bytes(1000 - 2 - 1 - 2 - 1)
    assert len(encode(Publish("t", payload, 1, False, False, 1), 5)) == 1003
    assert len(conn.events(encode(Publish("t", payload, 1, False, False, 1), 5))) == 1
    error = error_of(conn, encode(Publish("t", payload + b"x", 1, False, False, 2), 5))
    assert error.reason_code == reasons.PACKET_TOO_LARGE
    assert decode_packet(conn.reject(error), 5).reason_code == 0x95  # type: ignore[union-attr]
    assert decode_packet(connected(5).send(Pingresp()), 5) == Pingresp()
    assert ServerConnection().announced_packet_size is None


def test_topic_alias_beyond_what_the_server_announced() -> None:
    conn = connected(5)
    error = error_of(conn, encode(Publish("t", b"", properties=Properties(topic_alias=1)), 5))
    assert error.reason_code == reasons.TOPIC_ALIAS_INVALID


def test_subscription_identifier_in_a_client_publish() -> None:
    error = error_of(connected(5), encode(Publish("t", b"", properties=Properties(subscription_identifier=1)), 5))
    assert error.reason_code == reasons.PROTOCOL_ERROR


def test_subscription_identifier_when_announced_unavailable() -> None:
    subscribe = encode(Subscribe(packet_id=1, topics=(("a", SubscriptionOptions(1)),),
                                 properties=Properties(subscription_identifier=4)), 5)
    assert len(connected(5).events(subscribe)) == 1  # the default: available
    conn = connected(5, Connack(properties=Properties(subscription_identifier_available=0)))
    error = error_of(conn, subscribe)
    assert error.reason_code == reasons.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED


# -- errors before a CONNECT is understood ----------------------------------------------------------------


def test_malformed_v5_connect_is_answered_in_v5() -> None:
    conn = ServerConnection()
    body = b"\x00\x04MQTT\x05\x02\x00\x3c\x03\x21\x00\x00\x00\x00"  # receive maximum 0
    error = error_of(conn, bytes((0x10, len(body))) + body)
    reply = decode_packet(conn.reject(error), 5)
    assert isinstance(reply, Connack) and reply.reason_code == reasons.PROTOCOL_ERROR


def test_unsupported_version_is_answered_in_3_1_1() -> None:
    conn = ServerConnection()
    body = b"\x00\x04MQTT\x07\x02\x00\x3c\x00\x00"
    error = error_of(conn, bytes((0x10, len(body))) + body)
    assert conn.reject(error) == b"\x20\x02\x00\x01"


def test_errors_are_sticky() -> None:
    conn = ServerConnection()
    with pytest.raises(MQTTProtocolError):
        conn.receive_data(b"\x00\x00")
        conn.next_event()
    with pytest.raises(MQTTProtocolError, match="expected CONNECT|reserved"):
        conn.next_event()


# -- arbitrary input --------------------------------------------------------------------------------------


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"", CONNECT4, CONNECT5]), st.binary(max_size=300), st.integers(1, 64))
def test_arbitrary_bytes_only_raise_protocol_errors(prefix: bytes, data: bytes, chunk: int) -> None:
    conn = ServerConnection(max_packet_size=200)
    stream = prefix + data
    try:
        for start in range(0, len(stream), chunk):
            conn.receive_data(stream[start : start + chunk])
            while conn.next_event() is not NEED_DATA:
                pass
            if conn.state is State.CONNECTING:
                conn.send(Connack())
    except MQTTProtocolError as exc:
        assert 0x80 <= exc.reason_code <= 0xA2
        assert conn.reject(exc) is not None
        assert conn.state is State.CLOSED
