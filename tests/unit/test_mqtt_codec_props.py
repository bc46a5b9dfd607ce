"""Properties of the MQTT codec over generated packets and arbitrary bytes."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.mqtt import (
    MAX_REMAINING_LENGTH,
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
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_packet_id,
    encode_publish,
    encode_publish_head,
    encode_remaining_length,
)

# MQTT strings: any code point but U+0000 and surrogates (which UTF-8 cannot carry).
strings = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
topic_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), max_size=20)
# Payloads straddle the 127/128 boundary of the remaining-length varint.
payloads = st.binary(max_size=300)
packet_ids = st.integers(1, 65_535)
qos_levels = st.integers(0, 2)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(qos_levels)
    if qos == 0:
        return Publish(draw(topic_names), draw(payloads), 0, draw(st.booleans()), False, None)
    return Publish(draw(topic_names), draw(payloads), qos, draw(st.booleans()), draw(st.booleans()), draw(packet_ids))


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    mqtt31 = draw(st.booleans())
    clean_session = draw(st.booleans())
    client_id = draw(strings)
    if not client_id and (mqtt31 or not clean_session):
        client_id = "c"
    username = draw(st.none() | strings)
    password = draw(st.none() | st.binary(max_size=40))
    if username is None and not mqtt31:
        password = None
    will = draw(
        st.none()
        | st.builds(Will, topic=topic_names, payload=st.binary(max_size=40), qos=qos_levels, retain=st.booleans())
    )
    return Connect(
        protocol_name="MQIsdp" if mqtt31 else "MQTT",
        protocol_level=3 if mqtt31 else 4,
        clean_session=clean_session,
        keepalive=draw(st.integers(0, 65_535)),
        client_id=client_id,
        will=will,
        username=username,
        password=password,
    )


@st.composite
def connacks(draw: st.DrawFn) -> Connack:
    code = draw(st.integers(0, 255))
    return Connack(session_present=draw(st.booleans()) and code == 0, reason_code=code)


packets: st.SearchStrategy[Packet] = st.one_of(
    publishes(),
    connects(),
    connacks(),
    st.builds(Puback, packet_ids),
    st.builds(Pubrec, packet_ids),
    st.builds(Pubrel, packet_ids),
    st.builds(Pubcomp, packet_ids),
    st.builds(
        Subscribe,
        packet_id=packet_ids,
        topics=st.lists(st.tuples(strings, qos_levels.map(QOS_OPTIONS.__getitem__)), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(
        Suback,
        packet_id=packet_ids,
        reason_codes=st.lists(st.sampled_from((0, 1, 2, SUBACK_FAILURE)), min_size=1, max_size=5).map(tuple),
    ),
    st.builds(Unsubscribe, packet_id=packet_ids, topics=st.lists(strings, min_size=1, max_size=5).map(tuple)),
    st.builds(Unsuback, packet_ids),
    st.just(Pingreq()),
    st.just(Pingresp()),
    st.just(Disconnect()),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@given(packets)
def test_every_packet_round_trips(packet: Packet) -> None:
    assert MQTTDecoder().packets(encode(packet)) == [packet]


@given(st.lists(packets, min_size=1, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_a_valid_stream_decodes_the_same(items: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(packet) for packet in items)
    decoder = MQTTDecoder()
    got: list[Packet] = []
    for chunk in split(stream, cuts):
        got += decoder.packets(chunk)
    assert got == items
    assert decoder.buffered == 0


@given(st.lists(packets, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=6))
def test_feed_and_next_packet_agree_with_packets(items: list[Packet], cuts: list[int]) -> None:
    stream = b"".join(encode(packet) for packet in items)
    decoder = MQTTDecoder()
    got: list[Packet] = []
    for chunk in split(stream, cuts):
        decoder.feed(chunk)
        while (packet := decoder.next_packet()) is not None:
            got.append(packet)
    assert got == items


@given(publishes())
def test_fast_publish_encoders_agree_with_encode(packet: Publish) -> None:
    wire = encode(packet)
    assert encode_publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id) == wire
    template = PublishTemplate(packet.topic, packet.payload, packet.retain)
    assert template.encode(packet.qos, packet.packet_id, packet.dup) == wire
    if packet.qos:
        assert packet.packet_id is not None
        head = template.header(packet.qos, packet.dup)
        assert head + encode_packet_id(packet.packet_id) + packet.payload == wire


@given(publishes())
def test_publish_head_plus_id_plus_payload_is_the_generic_encoding(packet: Publish) -> None:
    """The broker's fast path (one head per topic, size and flags) writes what `encode` writes."""
    head = encode_publish_head(packet.topic, len(packet.payload), packet.qos, packet.retain, packet.dup)
    packet_id = encode_packet_id(packet.packet_id) if packet.packet_id is not None else b""
    assert head + packet_id + packet.payload == encode(packet)


@settings(max_examples=40)
@given(topic_names, st.integers(0, 3_000_000), qos_levels, st.booleans(), st.booleans())
def test_publish_head_agrees_for_every_remaining_length_width(
    topic: str, size: int, qos: int, retain: bool, dup: bool
) -> None:
    """Heads of one- to four-byte remaining lengths, checked against whole generic encodings."""
    dup = dup and qos > 0
    payload = bytes(size)
    packet_id = 7 if qos else None
    wire = encode_publish(topic, payload, qos, retain, dup, packet_id)
    head = encode_publish_head(topic, size, qos, retain, dup)
    assert wire.startswith(head)
    assert len(wire) == len(head) + (2 if qos else 0) + size


def decode_everything(decoder: MQTTDecoder, chunks: list[bytes]) -> None:
    """Decode; only MQTTProtocolError may escape, and what decodes re-encodes faithfully."""
    try:
        for chunk in chunks:
            for packet in decoder.packets(chunk):
                assert MQTTDecoder().packets(encode(packet)) == [packet]
    except MQTTProtocolError:
        pass


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.lists(st.integers(0, 10_000), max_size=8), st.integers(0, 500))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes, cuts: list[int], max_size: int) -> None:
    decode_everything(MQTTDecoder(max_packet_size=max_size), split(data, cuts))


@given(
    st.lists(packets, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_corrupted_valid_streams_only_raise_protocol_errors(
    items: list[Packet], flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    stream = bytearray(b"".join(encode(packet) for packet in items))
    for position, value in flips:
        stream[position % len(stream)] = value
    decode_everything(MQTTDecoder(), split(bytes(stream), cuts))


@example(1)
@example(127)
@example(128)
@example(16_383)
@example(16_384)
@example(2_097_151)
@example(2_097_152)
@example(MAX_REMAINING_LENGTH)
@given(st.integers(1, MAX_REMAINING_LENGTH))
def test_remaining_length_round_trips(length: int) -> None:
    header = b"\x30" + encode_remaining_length(length)
    expected_size = 1 if length < 128 else 2 if length < 16_384 else 3 if length < 2_097_152 else 4
    assert len(header) == 1 + expected_size
    # The decoder reads exactly `length`: one less than that as the cap refuses it...
    try:
        MQTTDecoder(max_packet_size=length - 1).packets(header)
    except MQTTProtocolError as exc:
        assert f"packet of {length} bytes exceeds" in str(exc)
    else:
        raise AssertionError("a remaining length above the cap was accepted")
    # ...and at exactly that cap it waits for the body.
    decoder = MQTTDecoder(max_packet_size=length)
    assert decoder.packets(header) == []
    assert decoder.buffered == len(header)


def test_remaining_length_zero() -> None:
    assert encode_remaining_length(0) == b"\x00"
    assert MQTTDecoder(max_packet_size=0).packets(b"\xc0\x00") == [Pingreq()]
