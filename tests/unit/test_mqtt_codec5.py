"""The codec in its MQTT 5 form: byte vectors from the specification, paho's v5 packets, every property, bad input."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.mqtt import (
    EMPTY,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MQTTDecoder,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Properties,
    PropertyId,
    Puback,
    Pubcomp,
    Publish,
    PublishTemplate,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    SubscriptionOptions,
    Unsuback,
    Unsubscribe,
    Will,
    decode_packet,
    encode,
    encode_packet_id5,
    encode_publish_head,
)
from gateway.mqtt import reasons
from gateway.mqtt.kinds import AUTH, CONNACK, CONNECT, DISCONNECT, PUBACK, PUBLISH, SUBSCRIBE, WILL
from gateway.mqtt.properties import SPEC, decode_properties, encode_properties


def h(text: str) -> bytes:
    """Hex with spaces and `'ascii'` runs, so vectors read like the spec's tables."""
    out = bytearray()
    for token in text.split():
        if token.startswith("'"):
            out += token.strip("'").encode()
        else:
            out += bytes.fromhex(token)
    return bytes(out)


VECTORS: list[tuple[str, bytes, Packet]] = [
    (
        "connect-minimal",
        h("10 0D 00 04 'MQTT' 05 02 00 3C 00 00 00"),
        Connect(protocol_level=5, keepalive=60),
    ),
    (
        "connect-properties-will",
        h("10 2A 00 04 'MQTT' 05 CE 00 0A 05 11 00 00 00 78 00 02 'c1' 05 18 00 00 00 05 00 03 'w/t'"
          " 00 03 'bye' 00 01 'u' 00 01 'p'"),
        Connect(
            protocol_level=5, clean_session=True, keepalive=10, client_id="c1",
            will=Will(topic="w/t", payload=b"bye", qos=1, properties=Properties(will_delay_interval=5)),
            username="u", password=b"p", properties=Properties(session_expiry_interval=120),
        ),
    ),
    ("connack-accepted", h("20 03 00 00 00"), Connack()),
    ("connack-bad-credentials", h("20 03 00 86 00"), Connack(reason_code=0x86)),
    (
        "connack-assigned-id",
        h("20 0A 01 00 07 12 00 04 'auto'"),
        Connack(session_present=True, properties=Properties(assigned_client_identifier="auto")),
    ),
    ("publish-qos0", h("30 08 00 03 'a/b' 00 'hi'"), Publish("a/b", b"hi")),
    ("publish-qos1", h("32 0A 00 03 'a/b' 00 0A 00 'hi'"), Publish("a/b", b"hi", 1, False, False, 10)),
    (
        "publish-properties",
        h("34 16 00 03 'a/b' 00 0B 0D 03 00 0A 'text/plain' 'x'"),
        Publish("a/b", b"x", 2, False, False, 11, Properties(content_type="text/plain")),
    ),
    ("puback-short", h("40 02 00 0A"), Puback(10)),
    ("puback-reason", h("40 03 00 0A 87"), Puback(10, 0x87)),
    (
        "puback-reason-string",
        h("40 09 00 0A 97 05 1F 00 02 'no'"),
        Puback(10, 0x97, Properties(reason_string="no")),
    ),
    ("pubrec-reason", h("50 03 00 0A 10"), Pubrec(10, 0x10)),
    ("pubrel", h("62 02 00 0A"), Pubrel(10)),
    ("pubcomp-not-found", h("70 03 00 0A 92"), Pubcomp(10, 0x92)),
    (
        "subscribe-options",
        h("82 09 00 01 00 00 03 'a/+' 2D"),
        Subscribe(packet_id=1, topics=(("a/+", SubscriptionOptions(1, True, True, 2)),)),
    ),
    (
        "subscribe-identifier",
        h("82 0A 00 01 03 0B 80 01 00 01 '#' 00"),
        Subscribe(packet_id=1, topics=(("#", SubscriptionOptions(0)),),
                  properties=Properties(subscription_identifier=128)),
    ),
    ("suback", h("90 06 00 01 00 01 87 9E"), Suback(packet_id=1, reason_codes=(1, 0x87, 0x9E))),
    ("unsubscribe", h("A2 07 00 02 00 00 02 'a/'"), Unsubscribe(packet_id=2, topics=("a/",))),
    ("unsuback", h("B0 05 00 02 00 00 11"), Unsuback(2, (0, 0x11))),
    ("pingreq", h("C0 00"), Pingreq()),
    ("pingresp", h("D0 00"), Pingresp()),
    ("disconnect-normal", h("E0 00"), Disconnect()),
    ("disconnect-reason", h("E0 01 8E"), Disconnect(reason_code=0x8E)),
    (
        "disconnect-properties",
        h("E0 07 04 05 11 00 00 00 00"),
        Disconnect(reason_code=0x04, properties=Properties(session_expiry_interval=0)),
    ),
    ("auth-success", h("F0 00"), Auth()),
    (
        "auth-continue",
        h("F0 16 18 14 15 00 0D 'SCRAM-SHA-256' 16 00 01 'x'"),
        Auth(reason_code=0x18, properties=Properties(authentication_method="SCRAM-SHA-256", authentication_data=b"x")),
    ),
]
IDS = [name for name, _, _ in VECTORS]


@pytest.mark.parametrize(("name", "wire", "packet"), VECTORS, ids=IDS)
def test_decode_v5_vector(name: str, wire: bytes, packet: Packet) -> None:
    assert MQTTDecoder(version=5).packets(wire) == [packet]


@pytest.mark.parametrize(("name", "wire", "packet"), VECTORS, ids=IDS)
def test_encode_v5_vector(name: str, wire: bytes, packet: Packet) -> None:
    assert encode(packet, 5) == wire


def test_a_v5_connect_switches_the_decoder_to_v5() -> None:
    decoder = MQTTDecoder()
    stream = VECTORS[0][1] + h("40 03 00 0A 87") + h("30 08 00 03 'a/b' 00 'hi'")
    assert decoder.packets(stream) == [VECTORS[0][2], Puback(10, 0x87), Publish("a/b", b"hi")]
    assert decoder.version == 5


def test_v5_stream_byte_by_byte() -> None:
    stream = b"".join(wire for _, wire, _ in VECTORS)
    decoder = MQTTDecoder(version=5)
    got: list[Packet] = []
    for index in range(len(stream)):
        got += decoder.packets(stream[index : index + 1])
    assert got == [packet for _, _, packet in VECTORS]


def test_v5_publish_fast_path_pieces_are_the_generic_encoding() -> None:
    for qos, packet_id in ((0, None), (1, 7), (2, 65535)):
        for size in (0, 1, 120, 126, 200, 20_000):
            payload = bytes(size)
            head = encode_publish_head("t/x", size, qos, True, qos > 0, version=5)
            middle = encode_packet_id5(packet_id) if packet_id is not None else b""
            assert head + middle + payload == encode(Publish("t/x", payload, qos, True, qos > 0, packet_id), 5)
            template = PublishTemplate("t/x", payload, retain=True, version=5)
            assert template.encode(qos, packet_id, qos > 0) == head + middle + payload


def test_v4_encoder_refuses_what_only_v5_can_carry() -> None:
    for packet in (
        Puback(1, 0x87),
        Publish("a", b"", properties=Properties(content_type="x")),
        Connack(reason_code=0, properties=Properties(maximum_qos=1)),
        Disconnect(reason_code=0x8E),
        Auth(),
        Unsuback(1, (0,)),
        Subscribe(packet_id=1, topics=(("a", SubscriptionOptions(1, no_local=True)),)),
        Connect(properties=Properties(session_expiry_interval=1)),
    ):
        with pytest.raises(ValueError):
            encode(packet, 4)


# -- paho's v5 packets ------------------------------------------------------------------------------


def paho_v5_packets() -> list[bytes]:
    """What paho's MQTT 5 client writes, captured before it reaches any socket."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-5", protocol=paho.MQTTv5)
    captured: list[bytes] = []

    def capture(command: int, packet: bytes, mid: int, qos: int, info: object = None) -> paho.MQTTErrorCode:
        captured.append(bytes(packet))
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    client._packet_queue = capture  # type: ignore[method-assign]
    client.username_pw_set("alice", "s3cret")
    will = PahoProperties(PacketTypes.WILLMESSAGE)
    will.WillDelayInterval = 30
    will.MessageExpiryInterval = 600
    will.UserProperty = ("origin", "dev-5")
    client.will_set("dev/5/status", b"offline", qos=1, retain=True, properties=will)
    connect = PahoProperties(PacketTypes.CONNECT)
    connect.SessionExpiryInterval = 3600
    connect.ReceiveMaximum = 20
    connect.MaximumPacketSize = 100_000
    connect.TopicAliasMaximum = 5
    connect.RequestProblemInformation = 0
    client._connect_properties = connect
    client._sock = object()  # paho only checks that it is set; nothing is sent
    client._send_connect(30)
    publish = PahoProperties(PacketTypes.PUBLISH)
    publish.PayloadFormatIndicator = 1
    publish.ContentType = "application/json"
    publish.ResponseTopic = "reply/5"
    publish.CorrelationData = b"\x00\x01corr"
    publish.UserProperty = ("k", "v")
    publish.UserProperty = ("k", "w")
    client.publish("a/b", b'{"x": 1}', qos=1, properties=publish)
    client.publish("a/é", b"x" * 300, qos=2, retain=True)
    subscribe = PahoProperties(PacketTypes.SUBSCRIBE)
    subscribe.UserProperty = ("why", "test")
    client.subscribe([("a/+", SubscribeOptions(qos=1, noLocal=True, retainHandling=1)), ("#", SubscribeOptions(qos=2))],
                     properties=subscribe)
    client.unsubscribe(["a/+", "#"])
    client._send_puback(5)
    client._send_pubrec(6)
    client._send_pubrel(7)
    client._send_pubcomp(8)
    client._send_pingreq()
    client._send_disconnect(reasoncode=paho.ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
    client._sock = None
    return captured


def test_decodes_what_paho_v5_sends_and_reencodes_it_byte_for_byte() -> None:
    wires = paho_v5_packets()
    decoded = MQTTDecoder().packets(b"".join(wires))
    connect = decoded[0]
    assert isinstance(connect, Connect) and connect.protocol_level == 5
    assert connect.properties.session_expiry_interval == 3600
    assert connect.properties.receive_maximum == 20
    assert connect.properties.request_problem_information == 0
    assert connect.will is not None and connect.will.properties.will_delay_interval == 30
    assert connect.will.properties.user_properties == (("origin", "dev-5"),)
    publish = decoded[1]
    assert isinstance(publish, Publish)
    assert publish.properties.user_properties == (("k", "v"), ("k", "w"))  # order kept
    assert publish.properties.correlation_data == b"\x00\x01corr"
    subscribe = decoded[3]
    assert isinstance(subscribe, Subscribe)
    assert subscribe.topics[0] == ("a/+", SubscriptionOptions(1, no_local=True, retain_handling=1))
    assert decoded[-1] == Disconnect(reason_code=reasons.DISCONNECT_WITH_WILL_MESSAGE)
    assert [encode(packet, 5) for packet in decoded] == wires


# -- properties -------------------------------------------------------------------------------------

#: A value of every property id, of its type.
SAMPLES: dict[int, object] = {
    PropertyId.PAYLOAD_FORMAT_INDICATOR: 1,
    PropertyId.MESSAGE_EXPIRY_INTERVAL: 0xFFFF_FFFF,
    PropertyId.CONTENT_TYPE: "text/é",
    PropertyId.RESPONSE_TOPIC: "r/t",
    PropertyId.CORRELATION_DATA: b"\x00\xff",
    PropertyId.SUBSCRIPTION_IDENTIFIER: 268_435_455,
    PropertyId.SESSION_EXPIRY_INTERVAL: 7,
    PropertyId.ASSIGNED_CLIENT_IDENTIFIER: "auto-1",
    PropertyId.SERVER_KEEP_ALIVE: 65_535,
    PropertyId.AUTHENTICATION_METHOD: "SCRAM-SHA-256",
    PropertyId.AUTHENTICATION_DATA: b"n,,n=user",
    PropertyId.REQUEST_PROBLEM_INFORMATION: 0,
    PropertyId.WILL_DELAY_INTERVAL: 60,
    PropertyId.REQUEST_RESPONSE_INFORMATION: 1,
    PropertyId.RESPONSE_INFORMATION: "resp/",
    PropertyId.SERVER_REFERENCE: "other:1883",
    PropertyId.REASON_STRING: "because",
    PropertyId.RECEIVE_MAXIMUM: 1,
    PropertyId.TOPIC_ALIAS_MAXIMUM: 10,
    PropertyId.TOPIC_ALIAS: 3,
    PropertyId.MAXIMUM_QOS: 1,
    PropertyId.RETAIN_AVAILABLE: 0,
    PropertyId.USER_PROPERTY: ("key", "value"),
    PropertyId.MAXIMUM_PACKET_SIZE: 1_000_000,
    PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE: 1,
    PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE: 0,
    PropertyId.SHARED_SUBSCRIPTION_AVAILABLE: 1,
}


def test_every_property_id_has_a_sample() -> None:
    assert set(SAMPLES) == set(SPEC) == {member.value for member in PropertyId}


@pytest.mark.parametrize("kind", [CONNECT, CONNACK, PUBLISH, WILL, PUBACK, SUBSCRIBE, DISCONNECT, AUTH])
def test_every_property_a_packet_may_carry_round_trips(kind: int) -> None:
    items = [(pid, value) for pid, value in SAMPLES.items() if SPEC[pid][1] & (1 << kind)]
    items.append((PropertyId.USER_PROPERTY, ("key", "second")))  # repeatable everywhere
    props = Properties(items)
    wire = encode_properties(props, kind)
    decoded, end = decode_properties(wire, 0, len(wire), kind)
    assert decoded == props and end == len(wire)


def test_every_property_in_a_whole_packet() -> None:
    def allowed(kind: int) -> Properties:
        return Properties([(pid, value) for pid, value in SAMPLES.items() if SPEC[pid][1] & (1 << kind)])

    for packet in (
        Connect(protocol_level=5, client_id="c", properties=allowed(CONNECT),
                will=Will(topic="w", payload=b"", properties=allowed(WILL))),
        Connack(properties=allowed(CONNACK)),
        Publish("t", b"p", 1, False, False, 1, allowed(PUBLISH)),
        Puback(1, 0x10, allowed(PUBACK)),
        Disconnect(reason_code=0x8B, properties=allowed(DISCONNECT)),
        Auth(reason_code=0x18, properties=allowed(AUTH)),
    ):
        assert decode_packet(encode(packet, 5), 5) == packet


def test_properties_by_name_and_accessors() -> None:
    props = Properties(message_expiry_interval=30, user_property=[("a", "1"), ("b", "2")],
                       subscription_identifier=[1, 2])
    assert props.message_expiry_interval == 30
    assert props.user_properties == (("a", "1"), ("b", "2"))
    assert props.subscription_identifiers == (1, 2)
    assert props.content_type is None
    assert PropertyId.MESSAGE_EXPIRY_INTERVAL in props
    assert props.replace(message_expiry_interval=5).message_expiry_interval == 5
    assert props.without(PropertyId.USER_PROPERTY).user_properties == ()
    assert Properties(user_property=("k", "v")).user_properties == (("k", "v"),)
    assert not EMPTY and len(props) == 5
    assert "message_expiry_interval=30" in repr(props)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Properties(payload_format_indicator=2),
        lambda: Properties(receive_maximum=0),
        lambda: Properties(topic_alias=0),
        lambda: Properties(subscription_identifier=0),
        lambda: Properties(maximum_packet_size=0),
        lambda: Properties(message_expiry_interval=-1),
        lambda: Properties(message_expiry_interval=2**32),
        lambda: Properties(server_keep_alive=65_536),
        lambda: Properties(content_type=b"bytes"),
        lambda: Properties(content_type="nul\x00"),
        lambda: Properties(correlation_data="text"),
        lambda: Properties(correlation_data=bytes(65_536)),
        lambda: Properties(user_property=("only-key",)),
        lambda: Properties(maximum_qos=True),
        lambda: Properties([(PropertyId.CONTENT_TYPE, "a"), (PropertyId.CONTENT_TYPE, "b")]),
        lambda: Properties([(0x05, 1)]),
        lambda: Properties(no_such_property=1),
    ],
)
def test_property_values_are_checked(make: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        make()  # type: ignore[operator]


def test_encoding_refuses_a_property_the_packet_may_not_carry() -> None:
    with pytest.raises(ValueError, match="may not appear in PUBACK"):
        encode(Puback(1, 0, Properties(content_type="x")), 5)
    with pytest.raises(ValueError, match="only once in SUBSCRIBE"):
        encode(Subscribe(packet_id=1, topics=(("a", SubscriptionOptions()),),
                         properties=Properties(subscription_identifier=[1, 2])), 5)


def test_properties_are_immutable_and_hashable() -> None:
    props = Properties(content_type="x")
    with pytest.raises(AttributeError):
        props.items = ()  # type: ignore[misc]
    assert hash(props) == hash(Properties(content_type="x"))
    assert {Publish("a", b"", properties=props), Publish("a", b"", properties=Properties(content_type="x"))} == {
        Publish("a", b"", properties=props)}


# -- malformed input and its reason code --------------------------------------------------------------

MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("auth-in-v4", h("F0 00"), 0x81, "reserved"),
    ("publish-no-property-length", h("30 05 00 03 'a/b'"), 0x81, "property length"),
    ("publish-property-length-past-end", h("30 07 00 03 'a/b' 05 01"), 0x81, "past the end"),
    ("publish-unknown-property", h("30 08 00 03 'a/b' 02 05 01"), 0x81, "not a property identifier"),
    ("publish-wrong-packet-property", h("30 0A 00 03 'a/b' 04 11 00 00 00"), 0x81, "may not appear in PUBLISH"),
    ("publish-duplicate-property", h("30 0A 00 03 'a/b' 04 01 00 01 01"), 0x82, "more than once"),
    ("publish-payload-format-2", h("30 08 00 03 'a/b' 02 01 02"), 0x82, "0 or 1"),
    ("publish-topic-alias-0", h("30 09 00 03 'a/b' 03 23 00 00"), 0x82, "must not be 0"),
    ("publish-bad-utf8-content-type", h("30 0A 00 03 'a/b' 04 03 00 01 FF"), 0x81, "UTF-8"),
    ("publish-varint-5-bytes", h("30 0A 00 03 'a/b' FF FF FF FF 01"), 0x81, "longer than 4 bytes"),
    ("puback-bad-reason", h("40 03 00 01 92"), 0x81, "not defined for PUBACK"),
    ("pubrel-bad-reason", h("62 03 00 01 87"), 0x81, "not defined for PUBREL"),
    ("subscribe-reserved-option-bits", h("82 07 00 01 00 00 01 'a' C1"), 0x81, "reserved bits"),
    ("subscribe-retain-handling-3", h("82 07 00 01 00 00 01 'a' 30"), 0x82, "retain handling 3"),
    ("subscribe-qos-3", h("82 07 00 01 00 00 01 'a' 03"), 0x81, "QoS 3"),
    ("disconnect-bad-reason", h("E0 01 05"), 0x81, "not defined for DISCONNECT"),
    ("auth-bad-reason", h("F0 01 01"), 0x81, "not defined for AUTH"),
    ("unsuback-no-codes", h("B0 03 00 01 00"), 0x81, "no reason code"),
    ("oversize", h("30 FF FF 7F"), 0x95, "exceeds the maximum packet size"),
]


@pytest.mark.parametrize(("name", "wire", "code", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_v5_input_carries_its_reason_code(name: str, wire: bytes, code: int, message: str) -> None:
    decoder = MQTTDecoder(max_packet_size=10_000, version=4 if name == "auth-in-v4" else 5)
    with pytest.raises(MQTTProtocolError, match=message) as caught:
        decoder.packets(wire)
    assert caught.value.reason_code == code
    with pytest.raises(MQTTProtocolError, match=message) as again:
        decoder.packets(b"")
    assert again.value.reason_code == code


@pytest.mark.parametrize(
    ("body", "code", "connack_code"),
    [
        (h("00 04 'MQTT' 06 02 00 3C 00 00 00"), 0x84, 1),  # a version after 5
        (h("00 04 'MQTT' 05 00 00 3C 00 00 00"), None, None),  # empty id without clean start: fine in v5
        (h("00 04 'MQTT' 05 02 00 3C 03 21 00 00 00 00"), 0x82, None),  # receive maximum 0
        (h("00 04 'MQTT' 05 02 00 3C 02 17 02 00 00"), 0x82, None),  # request problem information 2
        (h("00 04 'MQTT' 05 02 00 3C 05 02 00 00 00 01 00 00"), 0x81, None),  # message expiry in CONNECT
    ],
)
def test_v5_connect_rules(body: bytes, code: int | None, connack_code: int | None) -> None:
    wire = bytes((0x10, len(body))) + body
    decoder = MQTTDecoder()
    if code is None:
        (packet,) = decoder.packets(wire)
        assert isinstance(packet, Connect) and packet.client_id == "" and not packet.clean_session
        return
    with pytest.raises(MQTTProtocolError) as caught:
        decoder.packets(wire)
    assert (caught.value.reason_code, caught.value.connack_code) == (code, connack_code)


# -- properties of the codec over generated packets ----------------------------------------------------

strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
topic_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), max_size=12)
packet_ids = st.integers(1, 65_535)


def _value(property_id: int) -> st.SearchStrategy[object]:
    data_type = SPEC[property_id][0]
    if property_id in (PropertyId.PAYLOAD_FORMAT_INDICATOR, PropertyId.REQUEST_PROBLEM_INFORMATION,
                       PropertyId.REQUEST_RESPONSE_INFORMATION, PropertyId.MAXIMUM_QOS, PropertyId.RETAIN_AVAILABLE,
                       PropertyId.WILDCARD_SUBSCRIPTION_AVAILABLE, PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
                       PropertyId.SHARED_SUBSCRIPTION_AVAILABLE):
        return st.integers(0, 1)
    low = 1 if property_id in (PropertyId.SUBSCRIPTION_IDENTIFIER, PropertyId.RECEIVE_MAXIMUM,
                               PropertyId.TOPIC_ALIAS, PropertyId.MAXIMUM_PACKET_SIZE) else 0
    return [
        st.integers(low, 0xFF), st.integers(low, 0xFFFF), st.integers(low, 0xFFFF_FFFF),
        st.integers(low, 268_435_455), strings, st.binary(max_size=12), st.tuples(strings, strings),
    ][data_type]


def properties_for(kind: int) -> st.SearchStrategy[Properties]:
    ids = sorted(pid for pid in SPEC if SPEC[pid][1] & (1 << kind))

    @st.composite
    def build(draw: st.DrawFn) -> Properties:
        chosen = draw(st.lists(st.sampled_from(ids), unique=True, max_size=4))
        items = [(pid, draw(_value(pid))) for pid in chosen]
        items += [(PropertyId.USER_PROPERTY, pair) for pair in draw(st.lists(st.tuples(strings, strings), max_size=2))]
        return Properties(items)

    return build()


options = st.builds(SubscriptionOptions, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2))
ack_codes = {Puback: reasons.PUBACK_CODES, Pubrec: reasons.PUBREC_CODES, Pubrel: reasons.PUBREL_CODES,
             Pubcomp: reasons.PUBCOMP_CODES}


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    props = draw(properties_for(PUBLISH))
    if qos == 0:
        return Publish(draw(topic_names), draw(st.binary(max_size=200)), 0, draw(st.booleans()), False, None, props)
    return Publish(draw(topic_names), draw(st.binary(max_size=200)), qos, draw(st.booleans()), draw(st.booleans()),
                   draw(packet_ids), props)


@st.composite
def acks(draw: st.DrawFn) -> Packet:
    kind = draw(st.sampled_from(sorted(ack_codes, key=lambda k: k.__name__)))
    return kind(draw(packet_ids), draw(st.sampled_from(sorted(ack_codes[kind]))), draw(properties_for(kind_id(kind))))


def kind_id(kind: type) -> int:
    from gateway.mqtt.packets import KIND_OF

    return KIND_OF[kind]


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    will = draw(st.none() | st.builds(Will, topic=topic_names, payload=st.binary(max_size=20), qos=st.integers(0, 2),
                                      retain=st.booleans(), properties=properties_for(WILL)))
    return Connect(protocol_level=5, clean_session=draw(st.booleans()), keepalive=draw(st.integers(0, 65_535)),
                   client_id=draw(strings), will=will, username=draw(st.none() | strings),
                   password=draw(st.none() | st.binary(max_size=10)), properties=draw(properties_for(CONNECT)))


packets: st.SearchStrategy[Packet] = st.one_of(
    publishes(),
    acks(),
    connects(),
    st.builds(lambda code, props: Connack(reason_code=code, properties=props),
              st.sampled_from(sorted(reasons.CONNACK_CODES)), properties_for(CONNACK)),
    st.builds(lambda pid, topics, props: Subscribe(packet_id=pid, topics=tuple(topics), properties=props),
              packet_ids, st.lists(st.tuples(strings, options), min_size=1, max_size=3),
              properties_for(SUBSCRIBE).map(lambda p: p.without(PropertyId.SUBSCRIPTION_IDENTIFIER))),
    st.builds(lambda pid, codes: Suback(packet_id=pid, reason_codes=tuple(codes)),
              packet_ids, st.lists(st.sampled_from(sorted(reasons.SUBACK_CODES)), min_size=1, max_size=3)),
    st.builds(lambda pid, topics: Unsubscribe(packet_id=pid, topics=tuple(topics)),
              packet_ids, st.lists(strings, min_size=1, max_size=3)),
    st.builds(lambda pid, codes: Unsuback(pid, tuple(codes)),
              packet_ids, st.lists(st.sampled_from(sorted(reasons.UNSUBACK_CODES)), min_size=1, max_size=3)),
    st.builds(lambda code, props: Disconnect(reason_code=code, properties=props),
              st.sampled_from(sorted(reasons.DISCONNECT_CODES)), properties_for(DISCONNECT)),
    st.builds(lambda code, props: Auth(reason_code=code, properties=props),
              st.sampled_from(sorted(reasons.AUTH_CODES)), properties_for(AUTH)),
    st.just(Pingreq()),
    st.just(Pingresp()),
)


@given(packets)
def test_every_v5_packet_round_trips(packet: Packet) -> None:
    assert MQTTDecoder(version=5).packets(encode(packet, 5)) == [packet]


@given(st.lists(packets, min_size=1, max_size=6), st.lists(st.integers(0, 5_000), max_size=8))
def test_any_split_of_a_v5_stream_decodes_the_same(items: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(packet, 5) for packet in items)
    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    bounds = [0, *points, len(stream)]
    decoder = MQTTDecoder(version=5)
    got: list[Packet] = []
    for start, stop in zip(bounds, bounds[1:]):
        got += decoder.packets(stream[start:stop])
    assert got == items


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(0, 400))
def test_arbitrary_bytes_into_a_v5_decoder_only_raise_protocol_errors(data: bytes, max_size: int) -> None:
    try:
        for packet in MQTTDecoder(max_packet_size=max_size, version=5).packets(data):
            assert MQTTDecoder(version=5).packets(encode(packet, 5)) == [packet]
    except MQTTProtocolError as exc:
        assert 0x80 <= exc.reason_code <= 0xA2
