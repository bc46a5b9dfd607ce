"""The MQTT codec in its 3.1.1 form against byte vectors written from the specification."""

from __future__ import annotations

import dataclasses

import paho.mqtt.client as paho
import pytest

from gateway.backpressure import NO_PUBLISHER
from gateway.errors import ProtocolError
from gateway.router import Message, Router
from gateway.mqtt import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_UNACCEPTABLE_PROTOCOL_VERSION,
    DISCONNECT_BYTES,
    PINGREQ_BYTES,
    PINGRESP_BYTES,
    SUBACK_FAILURE,
    Connack,
    Connect,
    Disconnect,
    MQTTDecoder,
    MQTTProtocolError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    PublishTemplate,
    QOS_OPTIONS,
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
    encode_connack,
    encode_packet_id,
    encode_puback,
    encode_pubcomp,
    encode_publish,
    encode_publish_head,
    encode_pubrec,
    encode_pubrel,
    encode_remaining_length,
    encode_suback,
    encode_unsuback,
)


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
        h("10 0C 00 04 'MQTT' 04 02 00 3C 00 00"),
        Connect(clean_session=True, keepalive=60, client_id=""),
    ),
    (
        "connect-full",
        h("10 1E 00 04 'MQTT' 04 EC 00 0A 00 02 'c1' 00 03 'w/t' 00 03 'bye' 00 01 'u' 00 01 'p'"),
        Connect(
            clean_session=False,
            keepalive=10,
            client_id="c1",
            will=Will(topic="w/t", payload=b"bye", qos=1, retain=True),
            username="u",
            password=b"p",
        ),
    ),
    (
        "connect-mqtt31",
        h("10 11 00 06 'MQIsdp' 03 02 00 3C 00 03 'abc'"),
        Connect(protocol_name="MQIsdp", protocol_level=3, clean_session=True, keepalive=60, client_id="abc"),
    ),
    ("connack-accepted", h("20 02 00 00"), Connack(session_present=False, reason_code=0)),
    ("connack-session-present", h("20 02 01 00"), Connack(session_present=True, reason_code=0)),
    ("connack-not-authorized", h("20 02 00 05"), Connack(session_present=False, reason_code=5)),
    ("publish-qos0", h("30 07 00 03 'a/b' 'hi'"), Publish("a/b", b"hi")),
    ("publish-qos1-retain-dup", h("3B 09 00 03 'a/b' 00 0A 'hi'"), Publish("a/b", b"hi", 1, True, True, 10)),
    ("publish-qos2-empty", h("34 07 00 03 'a/b' 12 34"), Publish("a/b", b"", 2, False, False, 0x1234)),
    ("publish-utf8-topic", h("30 06 00 04 'a/' C3 A9"), Publish("a/é", b"")),
    ("puback", h("40 02 00 0A"), Puback(10)),
    ("pubrec", h("50 02 00 0A"), Pubrec(10)),
    ("pubrel", h("62 02 00 0A"), Pubrel(10)),
    ("pubcomp", h("70 02 FF FF"), Pubcomp(0xFFFF)),
    (
        "subscribe",
        h("82 0C 00 01 00 03 'a/+' 01 00 01 '#' 00"),
        Subscribe(packet_id=1, topics=(("a/+", QOS_OPTIONS[1]), ("#", QOS_OPTIONS[0]))),
    ),
    ("suback", h("90 05 00 01 01 80 02"), Suback(packet_id=1, reason_codes=(1, SUBACK_FAILURE, 2))),
    ("unsubscribe", h("A2 0A 00 02 00 03 'a/+' 00 01 '#'"), Unsubscribe(packet_id=2, topics=("a/+", "#"))),
    ("unsuback", h("B0 02 00 02"), Unsuback(2)),
    ("pingreq", h("C0 00"), Pingreq()),
    ("pingresp", h("D0 00"), Pingresp()),
    ("disconnect", h("E0 00"), Disconnect()),
]
VECTOR_IDS = [name for name, _, _ in VECTORS]


@pytest.mark.parametrize(("name", "wire", "packet"), VECTORS, ids=VECTOR_IDS)
def test_decode_vector(name: str, wire: bytes, packet: Packet) -> None:
    assert MQTTDecoder().packets(wire) == [packet]


@pytest.mark.parametrize(("name", "wire", "packet"), VECTORS, ids=VECTOR_IDS)
def test_encode_vector(name: str, wire: bytes, packet: Packet) -> None:
    assert encode(packet) == wire


def test_fast_encoders_match_vectors() -> None:
    assert encode_publish("a/b", b"hi") == h("30 07 00 03 'a/b' 'hi'")
    assert encode_publish("a/b", b"hi", 1, True, True, 10) == h("3B 09 00 03 'a/b' 00 0A 'hi'")
    assert encode_puback(10) == h("40 02 00 0A")
    assert encode_pubrec(10) == h("50 02 00 0A")
    assert encode_pubrel(10) == h("62 02 00 0A")
    assert encode_pubcomp(10) == h("70 02 00 0A")
    assert encode_unsuback(2) == h("B0 02 00 02")
    assert encode_connack(True, 0) == h("20 02 01 00")
    assert encode_connack(False, 4) == h("20 02 00 04")
    assert encode_suback(1, [0, 0x80]) == h("90 04 00 01 00 80")
    assert (PINGREQ_BYTES, PINGRESP_BYTES, DISCONNECT_BYTES) == (h("C0 00"), h("D0 00"), h("E0 00"))
    assert encode_packet_id(0x1234) == h("12 34")


@pytest.mark.parametrize(
    ("length", "wire"),
    [
        (0, "00"),
        (127, "7F"),
        (128, "80 01"),
        (16_383, "FF 7F"),
        (16_384, "80 80 01"),
        (2_097_151, "FF FF 7F"),
        (2_097_152, "80 80 80 01"),
        (268_435_455, "FF FF FF 7F"),
    ],
)
def test_remaining_length_table_of_the_spec(length: int, wire: str) -> None:
    assert encode_remaining_length(length) == h(wire)


def test_remaining_length_beyond_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_remaining_length(268_435_456)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 128, 200, 16_380, 16_400, 70_000])
def test_publish_sizes_around_varint_boundaries(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = encode_publish("t", payload, 1, False, False, 1)
    assert MQTTDecoder().packets(wire) == [Publish("t", payload, 1, False, False, 1)]


def test_byte_by_byte_feed_yields_every_packet() -> None:
    stream = b"".join(wire for _, wire, _ in VECTORS)
    decoder = MQTTDecoder()
    got: list[Packet] = []
    for index in range(len(stream)):
        got += decoder.packets(stream[index : index + 1])
    assert got == [packet for _, _, packet in VECTORS]
    assert decoder.buffered == 0


def test_feed_and_next_packet() -> None:
    stream = b"".join(wire for _, wire, _ in VECTORS)
    decoder = MQTTDecoder()
    got: list[Packet] = []
    for index in range(0, len(stream), 3):
        decoder.feed(stream[index : index + 3])
        while (packet := decoder.next_packet()) is not None:
            got.append(packet)
    assert got == [packet for _, _, packet in VECTORS]
    assert decoder.next_packet() is None


def test_several_packets_in_one_feed() -> None:
    stream = b"".join(wire for _, wire, _ in VECTORS) * 3
    assert MQTTDecoder().packets(stream) == [packet for _, _, packet in VECTORS] * 3


def test_partial_packet_is_kept_across_reads() -> None:
    first = encode_publish("a", b"x" * 300, 1, False, False, 1)
    second = encode_puback(2)
    decoder = MQTTDecoder()
    assert decoder.packets(first[:100]) == []
    assert decoder.buffered == 100
    assert decoder.packets(first[100:200]) == []
    assert decoder.packets(first[200:] + second[:1]) == [Publish("a", b"x" * 300, 1, False, False, 1)]
    assert decoder.buffered == 1
    assert decoder.packets(second[1:]) == [Puback(2)]
    assert decoder.buffered == 0


def test_accepts_bytearray_and_memoryview_and_returns_bytes_payloads() -> None:
    wire = encode_publish("a/b", b"payload", 1, False, False, 3)
    for data in (bytearray(wire), memoryview(wire)):
        (packet,) = MQTTDecoder().packets(data)  # type: ignore[arg-type]
        assert isinstance(packet, Publish)
        assert type(packet.payload) is bytes
        assert packet.payload == b"payload"


def test_repeated_and_alternating_topics_decode_correctly() -> None:
    # "a" carrying payload "/b" sits on the wire where "a/b" did: only the length tells them apart.
    messages = [("a/b", b"1"), ("a/c", b"2"), ("a/b", b"3"), ("a/b", b"4"), ("a/bc", b""), ("a", b"/b"), ("", b"")]
    stream = b"".join(encode_publish(topic, payload) for topic, payload in messages)
    decoder = MQTTDecoder()
    for _ in range(2):
        got = decoder.packets(stream)
        assert [(p.topic, p.payload) for p in got] == messages  # type: ignore[union-attr]


def test_decode_packet_needs_exactly_one_packet() -> None:
    assert decode_packet(h("C0 00")) == Pingreq()
    with pytest.raises(MQTTProtocolError, match="exactly one"):
        decode_packet(h("C0 00 C0 00"))
    with pytest.raises(MQTTProtocolError, match="exactly one"):
        decode_packet(h("30 05 00 03"))


def connect_body(name: bytes, level: int, flags: int, rest: bytes = h("00 02 'id'")) -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + h("00 3C") + rest
    return bytes((0x10, len(body))) + body


PROTOCOL_ERRORS: list[tuple[str, bytes, str]] = [
    ("reserved-type-0", h("00 00"), "reserved"),
    ("reserved-type-15", h("F0 00"), "reserved"),
    ("connect-flags", h("11 00"), "CONNECT fixed-header flags"),
    ("puback-flags", h("42 02 00 01"), "PUBACK fixed-header flags"),
    ("pubrel-flags-0", h("60 02 00 01"), "PUBREL fixed-header flags must be 0b0010"),
    ("subscribe-flags-0", h("80 06 00 01 00 01 'a' 00"), "SUBSCRIBE fixed-header flags must be 0b0010"),
    ("unsubscribe-flags-0", h("A0 05 00 01 00 01 'a'"), "UNSUBSCRIBE fixed-header flags must be 0b0010"),
    ("pingreq-flags", h("C1 00"), "PINGREQ fixed-header flags"),
    ("publish-qos3", h("36 07 00 03 'a/b' 00 01"), "QoS 3"),
    ("publish-qos0-dup", h("38 05 00 03 'a/b'"), "DUP"),
    ("remaining-length-5-bytes", h("30 FF FF FF FF 01"), "longer than 4 bytes"),
    ("remaining-length-4-continuations", h("30 80 80 80 80"), "longer than 4 bytes"),
    ("connect-level-3-for-mqtt", connect_body(b"MQTT", 3, 0x02), "protocol level 3"),
    ("connect-unknown-name", connect_body(b"MQTX", 4, 0x02), "unknown protocol name"),
    ("connect-reserved-flag", connect_body(b"MQTT", 4, 0x03), "reserved flag"),
    ("connect-will-qos-without-will", connect_body(b"MQTT", 4, 0x0A), "without the will flag"),
    ("connect-will-retain-without-will", connect_body(b"MQTT", 4, 0x22), "without the will flag"),
    ("connect-will-qos3", connect_body(b"MQTT", 4, 0x1E, h("00 02 'id' 00 01 't' 00 00")), "will QoS 3"),
    ("connect-password-without-username", connect_body(b"MQTT", 4, 0x42, h("00 02 'id' 00 01 'p'")), "password"),
    ("connect-client-id-bad-utf8", connect_body(b"MQTT", 4, 0x02, h("00 01 FF")), "not valid UTF-8"),
    ("connect-client-id-surrogate", connect_body(b"MQTT", 4, 0x02, h("00 03 ED A0 80")), "not valid UTF-8"),
    ("connect-client-id-nul", connect_body(b"MQTT", 4, 0x02, h("00 02 'a' 00")), r"U\+0000"),
    ("connect-username-nul", connect_body(b"MQTT", 4, 0x82, h("00 02 'id' 00 01 00")), r"username contains U\+0000"),
    ("connect-will-topic-wildcard", connect_body(b"MQTT", 4, 0x06, h("00 02 'id' 00 01 '#' 00 00")), "wildcards"),
    ("connect-trailing-garbage", connect_body(b"MQTT", 4, 0x02, h("00 02 'id' 00")), "unexpected bytes"),
    ("connect-truncated-username", connect_body(b"MQTT", 4, 0x82, h("00 02 'id' 00 05 'ab'")), "past the end"),
    ("connect-truncated-header", h("10 07 00 04 'MQTT' 04"), "truncated"),
    ("publish-topic-bad-utf8", h("30 03 00 01 FF"), "not valid UTF-8"),
    ("publish-topic-nul", h("30 05 00 03 'a' 00 'b'"), r"U\+0000"),
    ("publish-topic-plus", h("30 05 00 03 'a/+'"), "wildcards"),
    ("publish-topic-hash", h("30 05 00 03 'a/#'"), "wildcards"),
    ("publish-topic-past-end", h("30 04 00 05 'ab'"), "past the end"),
    ("publish-too-short", h("30 01 00"), "topic length"),
    ("publish-qos1-packet-id-0", h("32 07 00 03 'a/b' 00 00"), "packet id 0"),
    ("publish-qos1-no-packet-id", h("32 06 00 03 'a/b' 00"), "packet id"),
    ("puback-packet-id-0", h("40 02 00 00"), "packet id 0"),
    ("puback-trailing-garbage", h("40 03 00 01 00"), "must be 2"),
    ("pubrec-short", h("50 01 00"), "must be 2"),
    ("pingreq-trailing-garbage", h("C0 01 00"), "must be 0"),
    ("disconnect-trailing-garbage", h("E0 01 00"), "must be 0"),
    ("subscribe-no-topics", h("82 02 00 01"), "no topic filter"),
    ("subscribe-packet-id-0", h("82 06 00 00 00 01 'a' 00"), "packet id 0"),
    ("subscribe-qos-3", h("82 06 00 01 00 01 'a' 03"), "QoS byte 0x03"),
    ("subscribe-qos-reserved-bits", h("82 06 00 01 00 01 'a' 41"), "QoS byte 0x41"),
    ("subscribe-missing-qos", h("82 05 00 01 00 01 'a'"), "missing its requested QoS"),
    ("subscribe-filter-nul", h("82 06 00 01 00 01 00 00"), r"U\+0000"),
    ("unsubscribe-no-topics", h("A2 02 00 01"), "no topic filter"),
    ("unsubscribe-packet-id-0", h("A2 05 00 00 00 01 'a'"), "packet id 0"),
    ("unsubscribe-truncated", h("A2 05 00 01 00 02 'a'"), "past the end"),
    ("connack-reserved-flags", h("20 02 02 00"), "reserved"),
    ("connack-session-present-on-refusal", h("20 02 01 05"), "session present"),
    ("suback-reserved-code", h("90 03 00 01 03"), "reserved"),
    ("suback-no-codes", h("90 02 00 01"), "no return code"),
]


@pytest.mark.parametrize(("name", "wire", "message"), PROTOCOL_ERRORS, ids=[n for n, _, _ in PROTOCOL_ERRORS])
def test_protocol_errors_raise_and_stick(name: str, wire: bytes, message: str) -> None:
    decoder = MQTTDecoder()
    with pytest.raises(MQTTProtocolError, match=message) as caught:
        decoder.packets(wire)
    assert isinstance(caught.value, ProtocolError)
    # Sticky: even a valid packet afterwards is refused, on every entry point.
    for call in (
        lambda: decoder.packets(PINGREQ_BYTES),
        lambda: decoder.packets(b""),
        lambda: decoder.feed(PINGREQ_BYTES),
        decoder.next_packet,
    ):
        with pytest.raises(MQTTProtocolError, match=message):
            call()


@pytest.mark.parametrize(("name", "wire", "message"), PROTOCOL_ERRORS, ids=[n for n, _, _ in PROTOCOL_ERRORS])
def test_protocol_errors_also_found_byte_by_byte(name: str, wire: bytes, message: str) -> None:
    decoder = MQTTDecoder()
    with pytest.raises(MQTTProtocolError, match=message):
        for index in range(len(wire)):
            decoder.packets(wire[index : index + 1])


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (connect_body(b"MQTT", 3, 0x02), CONNACK_UNACCEPTABLE_PROTOCOL_VERSION),
        (connect_body(b"MQTT", 6, 0x02), CONNACK_UNACCEPTABLE_PROTOCOL_VERSION),
        (connect_body(b"MQIsdp", 4, 0x02), CONNACK_UNACCEPTABLE_PROTOCOL_VERSION),
        (connect_body(b"MQTT", 4, 0x00, h("00 00")), CONNACK_IDENTIFIER_REJECTED),
        (connect_body(b"MQIsdp", 3, 0x02, h("00 00")), CONNACK_IDENTIFIER_REJECTED),
        (connect_body(b"MQTX", 4, 0x02), None),
        (connect_body(b"MQTT", 4, 0x03), None),
    ],
)
def test_connack_code_tells_the_session_what_to_answer(wire: bytes, code: int | None) -> None:
    with pytest.raises(MQTTProtocolError) as caught:
        MQTTDecoder().packets(wire)
    assert caught.value.connack_code == code


def test_empty_client_id_with_clean_session_is_accepted() -> None:
    (packet,) = MQTTDecoder().packets(connect_body(b"MQTT", 4, 0x02, h("00 00")))
    assert isinstance(packet, Connect)
    assert packet.client_id == ""


def test_mqtt31_allows_password_without_username() -> None:
    (packet,) = MQTTDecoder().packets(connect_body(b"MQIsdp", 3, 0x42, h("00 02 'id' 00 02 'pw'")))
    assert isinstance(packet, Connect)
    assert (packet.username, packet.password) == (None, b"pw")


def test_oversize_is_refused_from_the_fixed_header_alone() -> None:
    decoder = MQTTDecoder(max_packet_size=100)
    with pytest.raises(MQTTProtocolError, match="exceeds the maximum packet size of 100"):
        decoder.packets(h("30 65"))  # remaining length 101, nothing else sent
    assert decoder.buffered == 0


def test_oversize_is_refused_from_a_partial_varint() -> None:
    decoder = MQTTDecoder(max_packet_size=100)
    with pytest.raises(MQTTProtocolError, match="exceeds"):
        decoder.packets(h("30 FF"))  # at least 127, whatever follows


def test_oversize_huge_declared_length_is_not_buffered() -> None:
    decoder = MQTTDecoder(max_packet_size=1024)
    with pytest.raises(MQTTProtocolError, match="268435455 bytes exceeds"):
        decoder.packets(h("30 FF FF FF 7F 00 01 'a'"))


def test_packet_of_exactly_the_maximum_size_is_accepted() -> None:
    wire = encode_publish("t", b"x" * 97)  # remaining length 2 + 1 + 97 = 100
    assert MQTTDecoder(max_packet_size=100).packets(wire) == [Publish("t", b"x" * 97)]


def test_max_packet_size_must_be_in_range() -> None:
    with pytest.raises(ValueError, match="max_packet_size"):
        MQTTDecoder(max_packet_size=268_435_456)


def test_packets_before_an_error_are_handed_over() -> None:
    decoder = MQTTDecoder()
    with pytest.raises(MQTTProtocolError) as caught:
        decoder.packets(PINGREQ_BYTES + encode_puback(1) + h("F0 00"))
    assert caught.value.decoded == (Pingreq(), Puback(1))
    with pytest.raises(MQTTProtocolError) as again:
        decoder.packets(b"")
    assert again.value.decoded == ()


def test_packets_queued_by_next_packet_are_handed_over_before_an_error() -> None:
    decoder = MQTTDecoder()
    decoder.feed(PINGREQ_BYTES + PINGRESP_BYTES)
    assert decoder.next_packet() == Pingreq()
    with pytest.raises(MQTTProtocolError) as caught:
        decoder.packets(encode_puback(1) + h("F0 00"))
    assert caught.value.decoded == (Pingresp(), Puback(1))


def test_packets_returns_what_next_packet_left_queued() -> None:
    decoder = MQTTDecoder()
    decoder.feed(PINGREQ_BYTES + PINGRESP_BYTES)
    assert decoder.next_packet() == Pingreq()
    assert decoder.packets(encode_puback(1)) == [Pingresp(), Puback(1)]


def test_next_packet_returns_packets_before_the_error_then_raises() -> None:
    decoder = MQTTDecoder()
    decoder.feed(PINGREQ_BYTES + h("F0 00"))
    assert decoder.next_packet() == Pingreq()
    with pytest.raises(MQTTProtocolError, match="reserved"):
        decoder.next_packet()
    with pytest.raises(MQTTProtocolError, match="reserved"):
        decoder.next_packet()


def test_publish_template_matches_encode_publish() -> None:
    payload = b"p" * 200
    template = PublishTemplate("a/b", payload)
    assert template.encode(0) == encode_publish("a/b", payload)
    assert template.encode(0) is template.encode(0)
    for qos in (1, 2):
        for dup in (False, True):
            expected = encode_publish("a/b", payload, qos, False, dup, 513)
            assert template.encode(qos, 513, dup) == expected
            assert template.header(qos, dup) + encode_packet_id(513) + payload == expected
    retained = PublishTemplate("a/b", b"r", retain=True)
    assert retained.encode(1, 2) == encode_publish("a/b", b"r", 1, True, False, 2)


def test_publish_head_vectors() -> None:
    # QoS 1, retain, DUP; topic "a/b"; 5-byte payload: remaining length 3+2 + 2 + 5 = 12.
    assert encode_publish_head("a/b", 5, 1, True, True) == h("3b 0c 00 03 'a/b'")
    assert encode_publish_head("a/b", 5) == h("30 0a 00 03 'a/b'")
    assert encode_publish_head("a/b", 5, 2) == h("34 0c 00 03 'a/b'")
    # 200-byte payload at QoS 0: 205 = 0xcd -> varint cd 01.
    assert encode_publish_head("a/b", 200) == h("30 cd 01 00 03 'a/b'")


def test_publish_head_refuses_impossible_combinations() -> None:
    with pytest.raises(ValueError, match="QoS"):
        encode_publish_head("a", 1, 3)
    with pytest.raises(ValueError, match="DUP"):
        encode_publish_head("a", 1, 0, dup=True)
    with pytest.raises(ValueError, match="negative"):
        encode_publish_head("a", -1)
    with pytest.raises(ValueError, match="exceeds"):
        encode_publish_head("a", 268_435_455, 1)


def test_publish_is_the_message_the_router_routes() -> None:
    """An allowed PUBLISH is routed as it is: its Message fields are the routed message."""
    packet = Publish("a/b", b"x", 1, True, True, 9)
    assert isinstance(packet, Message)
    assert (packet.topic, packet.payload, packet.qos, packet.retain) == ("a/b", b"x", 1, True)
    assert packet != Message("a/b", b"x", 1, True)  # a packet still differs from a bare message
    router = Router()
    got: list[tuple[Message, int, bool, object]] = []

    class Subscriber:
        def deliver(self, message: Message, qos: int, retain: bool, publisher: object) -> int:
            got.append((message, qos, retain, publisher))
            return 0  # status bits: nothing stored, nothing refused

    router.subscribe(Subscriber(), "a/+", 2)
    assert router.publish(packet) == 1  # ROUTED
    assert got == [(packet, 1, False, NO_PUBLISHER)] and got[0][0] is packet
    assert router.retained("a/b") == [packet]


def test_two_byte_remaining_length_split_between_its_bytes() -> None:
    wire = encode_publish("t", bytes(300), 1, False, False, 3)
    assert wire[1] & 0x80 and wire[2] < 0x80  # two length bytes
    for cut in (1, 2, 3):
        decoder = MQTTDecoder()
        assert decoder.packets(wire[:cut]) == []
        assert decoder.packets(wire[cut:]) == [Publish("t", bytes(300), 1, False, False, 3)]


def test_publish_template_refuses_impossible_combinations() -> None:
    template = PublishTemplate("a/b", b"")
    with pytest.raises(ValueError, match="packet id"):
        template.encode(1)
    with pytest.raises(ValueError, match="QoS"):
        template.header(3)
    with pytest.raises(ValueError, match="QoS"):
        template.header(-2)
    with pytest.raises(ValueError, match="DUP"):
        template.header(0, dup=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Publish("a", b"", 0, False, False, 1),
        lambda: Publish("a", b"", 0, False, True, None),
        lambda: Publish("a", b"", 1, False, False, None),
        lambda: Publish("a", b"", 1, False, False, 0),
        lambda: Publish("a", b"", 3, False, False, 1),
        lambda: Puback(0),
        lambda: Pubrel(65_536),
        lambda: Subscribe(packet_id=1, topics=()),
        lambda: Subscribe(packet_id=1, topics=(("a", 1),)),  # type: ignore[arg-type]
        lambda: SubscriptionOptions(3),
        lambda: Suback(packet_id=1, reason_codes=(3,)),
        lambda: Unsubscribe(packet_id=1, topics=()),
        lambda: Connack(session_present=True, reason_code=5),
        lambda: Will(topic="w", payload=b"", qos=3),
        lambda: Connect(keepalive=65_536),
    ],
)
def test_packet_constructors_check_invariants(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_packets_are_frozen() -> None:
    packet = Publish("a", b"")
    with pytest.raises(dataclasses.FrozenInstanceError):
        packet.topic = "b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Puback(1).packet_id = 2  # type: ignore[misc]


def test_encoder_refuses_what_mqtt_cannot_carry() -> None:
    with pytest.raises(ValueError, match="session present"):
        encode_connack(True, 5)
    with pytest.raises(ValueError, match="at most 65535"):
        encode_publish("a" * 65_536, b"")
    with pytest.raises(ValueError, match="packet id"):
        encode_publish("a", b"", 1)
    with pytest.raises(ValueError, match="QoS"):
        encode_publish("a", b"", 3, False, False, 1)
    with pytest.raises(ValueError, match="DUP"):
        encode_publish("a", b"", 0, False, True)
    with pytest.raises(TypeError, match="not an MQTT packet"):
        encode("PINGREQ")  # type: ignore[arg-type]


def paho_packets() -> list[bytes]:
    """What paho's client writes, captured before it reaches any socket."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dev-1", clean_session=False)
    captured: list[bytes] = []

    def capture(command: int, packet: bytes, mid: int, qos: int, info: object = None) -> paho.MQTTErrorCode:
        captured.append(bytes(packet))
        return paho.MQTTErrorCode.MQTT_ERR_SUCCESS

    client._packet_queue = capture  # type: ignore[method-assign]
    client.username_pw_set("alice", "s3cret")
    client.will_set("dev/1/status", b"offline", qos=1, retain=True)
    client._sock = object()  # paho only checks that it is set; nothing is sent
    client._send_connect(30)
    client.publish("a/b", b"hello", qos=0)
    client.publish("a/b", b"hello", qos=1)
    client.publish("a/é", b"x" * 300, qos=2, retain=True)
    client.subscribe([("a/+", 1), ("#", 2)])
    client.unsubscribe(["a/+", "#"])
    client._send_puback(5)
    client._send_pubrec(6)
    client._send_pubrel(7)
    client._send_pubcomp(8)
    client._send_pingreq()
    client._send_disconnect()
    client._sock = None
    return captured


def test_decodes_what_paho_sends_and_reencodes_it_byte_for_byte() -> None:
    wires = paho_packets()
    decoded = MQTTDecoder().packets(b"".join(wires))
    assert decoded[0] == Connect(
        clean_session=False,
        keepalive=30,
        client_id="dev-1",
        will=Will(topic="dev/1/status", payload=b"offline", qos=1, retain=True),
        username="alice",
        password=b"s3cret",
    )
    assert decoded[1] == Publish("a/b", b"hello")
    assert isinstance(decoded[2], Publish)
    assert (decoded[2].qos, decoded[2].payload) == (1, b"hello")
    assert isinstance(decoded[3], Publish)
    assert (decoded[3].topic, decoded[3].qos, decoded[3].retain, len(decoded[3].payload)) == ("a/é", 2, True, 300)
    assert isinstance(decoded[4], Subscribe)
    assert decoded[4].topics == (("a/+", QOS_OPTIONS[1]), ("#", QOS_OPTIONS[2]))
    assert isinstance(decoded[5], Unsubscribe)
    assert decoded[5].topics == ("a/+", "#")
    assert decoded[6:] == [Puback(5), Pubrec(6), Pubrel(7), Pubcomp(8), Pingreq(), Disconnect()]
    assert [encode(packet) for packet in decoded] == wires


def test_topic_caches_stay_bounded() -> None:
    from gateway.mqtt import codec

    decoder = MQTTDecoder()
    for index in range(5_000):
        topic = f"devices/{index}"
        assert decoder.packets(encode_publish(topic, b"")) == [Publish(topic, b"")]
    long_topic = "t" * 1_000
    assert decoder.packets(encode_publish(long_topic, b"")) == [Publish(long_topic, b"")]
    assert len(codec._topic_names) <= 4_096
    assert len(codec._topic_wire) <= 4_096
    assert long_topic.encode() not in codec._topic_names
    assert long_topic not in codec._topic_wire


def test_connect_repr_never_shows_the_password() -> None:
    packet = Connect(client_id="c", username="alice", password=b"hunter2-secret")
    assert "hunter2" not in repr(packet)
    assert "alice" in repr(packet)
